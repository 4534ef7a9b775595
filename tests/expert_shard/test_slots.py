"""`SlotStore` in-process: per-layer stacks give the same outputs as the experts one by one, for any
subset and order of experts, through loads and drops."""

from __future__ import annotations

import pytest
import torch

from dsv3.expert_shard.slots import SlotNotLoaded, SlotStore
from dsv3.kernels import reference

HIDDEN, WIDTH = 32, 16


def _weights(slot: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * slot[0] + slot[1])
    return torch.randn(2 * WIDTH, HIDDEN, generator=g), torch.randn(HIDDEN, WIDTH, generator=g)


def _read(slots):
    return {slot: _weights(slot) for slot in slots}


def _one_by_one(layer, experts, counts, rows, weights) -> torch.Tensor:
    out, start = [], 0
    for expert, count in zip(experts, counts, strict=True):
        gate_up, down = _weights((layer, expert))
        part = reference.grouped_swiglu(
            rows[start : start + count],
            torch.tensor([count]),
            gate_up[None],
            down[None],
            weights[start : start + count],
        )
        out.append(part)
        start += count
    return torch.cat(out)


def test_any_subset_in_any_order_matches_the_experts_one_by_one() -> None:
    store = SlotStore(capacity=40)
    store.load([(1, e) for e in range(0, 20, 2)] + [(2, e) for e in range(5)], _read, HIDDEN, WIDTH)
    torch.manual_seed(0)
    for trial in range(6):
        held = list(range(0, 20, 2))
        experts = [held[i] for i in torch.randperm(len(held))[: 3 + trial].tolist()]
        counts = torch.randint(0, 4, (len(experts),)).tolist()
        rows, weights = torch.randn(sum(counts), HIDDEN), torch.rand(sum(counts))
        out = store.compute(1, experts, counts, rows, weights)
        assert torch.allclose(out, _one_by_one(1, experts, counts, rows, weights), atol=1e-5)
    assert store.compute(1, [], [], torch.randn(0, HIDDEN), torch.rand(0)).shape == (0, HIDDEN)


def test_loads_and_drops_restack_their_layer() -> None:
    store = SlotStore(capacity=8)
    store.load([(0, 1), (0, 3)], _read, HIDDEN, WIDTH)
    store.load([(0, 2)], _read, HIDDEN, WIDTH)
    store.drop([(0, 1)])
    rows, weights = torch.randn(5, HIDDEN), torch.rand(5)
    out = store.compute(0, [3, 2], [2, 3], rows, weights)
    assert torch.allclose(out, _one_by_one(0, [3, 2], [2, 3], rows, weights), atol=1e-5)
    with pytest.raises(SlotNotLoaded, match="layer 0, expert 1"):
        store.compute(0, [1], [1], rows[:1], weights[:1])
    store.drop([(0, 2), (0, 3)])
    with pytest.raises(SlotNotLoaded, match="layer 0, expert 3"):
        store.compute(0, [3], [1], rows[:1], weights[:1])
    assert store.take_tokens() == {}
