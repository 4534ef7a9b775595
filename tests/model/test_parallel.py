"""Expert parallelism applied to a built model: layout, checkpoint names, refusals (one process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dsv3.model import DeepSeekV3
from dsv3.model.dispatch import AllToAllDispatcher, DispatchError
from dsv3.model.hf_names import to_hf_state_dict
from dsv3.model.moe import GroupedExperts
from dsv3.model.parallel import moe_layers, parallelize_experts


@pytest.fixture
def single_rank_group(tmp_path: Path):
    """A real gloo process group of one rank (the multi-rank runs are in test_expert_parallel.py)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_parallelize_swaps_dispatchers_and_keeps_the_function(
    debug_model: DeepSeekV3, single_rank_group
) -> None:
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = debug_model(ids).logits
    parallelize_experts(debug_model, single_rank_group)
    layers = moe_layers(debug_model)
    assert layers and all(isinstance(m.dispatcher, AllToAllDispatcher) for m in layers)
    with torch.no_grad():
        after = debug_model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(DispatchError, match="already sharded"):
        parallelize_experts(debug_model, single_rank_group)


def test_release_names_stay_layer_wide_on_a_slice(debug_model: DeepSeekV3) -> None:
    layer = moe_layers(debug_model)[0]
    full = layer.experts
    _, width2, hidden = full.gate_up_proj.shape
    second_half = GroupedExperts(8, hidden, width2 // 2, first_expert=8)
    with torch.no_grad():
        second_half.gate_up_proj.copy_(full.gate_up_proj[8:])
        second_half.down_proj.copy_(full.down_proj[8:])
    layer.experts = second_half
    names = to_hf_state_dict(debug_model)
    prefix = "model.layers.1.mlp.experts"
    experts = sorted({int(n.split(".")[5]) for n in names if n.startswith(prefix + ".")})
    assert experts == list(range(8, 16))
    torch.testing.assert_close(names[f"{prefix}.8.down_proj.weight"], full.down_proj[8])
