"""The expert-placement planner: valid EPLB-shaped tables, no two copies of an expert on one GPU,
determinism, balance on skewed loads, the migration-aware mode, and bad arguments refused by name."""

from __future__ import annotations

import pytest
import torch

from dsv3.balance.placement import migrate_experts, plan_shards, rebalance_experts

# (num_replicas, num_groups, num_nodes, num_gpus): hierarchical 4 and 8 nodes, and a global case
CONFIGS = [(36, 4, 2, 4), (40, 8, 4, 8), (40, 4, 3, 8)]


def _skewed(layers: int = 6, experts: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * 1.3) * 100


def _gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, gpus: int) -> torch.Tensor:
    per_copy = (weight.double() / logcnt).gather(1, phy2log)
    return per_copy.view(weight.shape[0], gpus, -1).sum(-1)


def _check_valid(weight, phy2log, log2phy, logcnt, replicas, gpus) -> None:
    layers, experts = weight.shape
    assert phy2log.shape == (layers, replicas) and logcnt.shape == (layers, experts)
    assert bool((logcnt >= 1).all())  # every expert has a copy
    assert logcnt.sum(1).tolist() == [replicas] * layers
    counted = torch.zeros_like(logcnt).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt)
    assert log2phy.shape == (layers, experts, int(logcnt.max()))
    for layer in range(layers):
        for e in range(experts):
            slots = log2phy[layer, e]
            real = slots[slots >= 0]
            assert len(real) == int(logcnt[layer, e]) and bool((slots[len(real) :] == -1).all())
            assert bool((phy2log[layer, real] == e).all())
    per_gpu = phy2log.view(layers, gpus, replicas // gpus)
    assert not bool((per_gpu.sort(-1).values.diff(dim=-1) == 0).any())  # no expert twice on a GPU


@pytest.mark.parametrize(("replicas", "groups", "nodes", "gpus"), CONFIGS)
def test_plan_is_valid_without_same_gpu_copies(replicas, groups, nodes, gpus) -> None:
    weight = _skewed()
    phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
    _check_valid(weight, phy2log, log2phy, logcnt, replicas, gpus)
    loads = _gpu_loads(weight, phy2log, logcnt, gpus)
    assert float((loads.max(1).values / loads.mean(1)).mean()) < 1.15  # skewed load, well spread


def test_hierarchical_keeps_a_copy_of_every_group_on_its_node() -> None:
    weight = _skewed()
    replicas, groups, nodes, gpus = 40, 8, 4, 8
    phy2log, _, _ = rebalance_experts(weight, replicas, groups, nodes, gpus)
    per_node = phy2log.view(weight.shape[0], nodes, -1)  # [L, node, slots of the node]
    group_size = weight.shape[1] // groups
    for layer in range(weight.shape[0]):
        homes = []
        for g in range(groups):
            members = set(range(g * group_size, (g + 1) * group_size))
            homes.append([n for n in range(nodes) if members <= set(per_node[layer, n].tolist())])
            assert homes[-1], f"layer {layer}: group {g} is on no single node"
        assert sum(len(h) == 1 for h in homes) >= groups // 2  # groups live on their node, not everywhere


def test_hot_node_gets_more_spare_slots() -> None:
    weight = torch.ones(1, 32, dtype=torch.float64)
    weight[0, :8] = 20.0  # group 0 is hot
    replicas, groups, nodes, gpus = 64, 4, 4, 8
    phy2log, _, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert int(logcnt[0, :8].sum()) > 16  # the hot group's experts hold more than their node's 16 slots
    loads = _gpu_loads(weight, phy2log, logcnt, gpus)
    # with the 16 slots of its own node only, the hot node's GPUs would carry 80 against a mean of 23
    assert float(loads.max() / loads.mean()) < 1.5


def test_same_input_same_plan() -> None:
    weight = _skewed(seed=3)
    first = rebalance_experts(weight, 40, 8, 4, 8)
    again = rebalance_experts(weight.clone(), 40, 8, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_idle_layers_get_an_even_spread() -> None:
    phy2log, _, logcnt = rebalance_experts(torch.zeros(2, 16), 32, 4, 2, 4)
    assert bool((logcnt == 2).all())
    _check_valid(torch.zeros(2, 16), phy2log, *rebalance_experts(torch.zeros(2, 16), 32, 4, 2, 4)[1:], 32, 4)


def test_migration_moves_few_slots_for_a_small_drift() -> None:
    weight = _skewed(seed=1)
    phy2log, _, _ = rebalance_experts(weight, 40, 4, 3, 8)
    g = torch.Generator().manual_seed(9)
    drifted = weight * torch.exp(torch.randn(weight.shape, generator=g, dtype=torch.float64) * 0.1)
    fresh = rebalance_experts(drifted, 40, 4, 3, 8)
    fresh_moved = int((fresh[0] != phy2log).sum())
    plan = migrate_experts(drifted, phy2log, 4, 3, 8, tolerance=0.05)
    _check_valid(drifted, plan.phy2log, plan.log2phy, plan.logcnt, 40, 8)
    assert int(plan.moved.sum()) < fresh_moved / 2
    loads = _gpu_loads(drifted, plan.phy2log, plan.logcnt, 8)
    fresh_loads = _gpu_loads(drifted, fresh[0], fresh[2], 8)
    assert bool((loads.max(1).values <= fresh_loads.max(1).values * 1.05 + 1e-9).all())
    same = migrate_experts(drifted, plan.phy2log, 4, 3, 8, tolerance=0.05)
    assert same.moved.tolist() == [0] * weight.shape[0]  # already good enough: nothing moves


def test_migration_when_load_changes_completely_reports_its_moves() -> None:
    weight = _skewed(seed=1)
    phy2log, _, _ = rebalance_experts(weight, 40, 4, 3, 8)
    flipped = weight.flip(1)
    plan = migrate_experts(flipped, phy2log, 4, 3, 8)
    assert int(plan.moved.sum()) > 0
    expected = sum(
        len(
            set(plan.phy2log[layer, g * 5 : g * 5 + 5].tolist())
            - set(phy2log[layer, g * 5 : g * 5 + 5].tolist())
        )
        for layer in range(weight.shape[0])
        for g in range(8)
    )
    assert int(plan.moved.sum()) == expected


def test_plan_shards_uneven_slots_minimum_copies_and_empty_slots() -> None:
    weight = _skewed(layers=2, experts=16)
    plan = plan_shards(weight, [11, 11, 10], min_replicas=2)
    assert bool((plan.logcnt >= 2).all()) and plan.logcnt.sum(1).tolist() == [32, 32]
    shard_of_slot = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 11, 10]))
    for layer in range(2):
        for s in range(3):
            held = plan.phy2log[layer, shard_of_slot == s].tolist()
            assert len(held) == len(set(held))
    current = plan.phy2log.clone()
    current[:, 22:] = -1  # the third shard lost its slots
    again = plan_shards(weight, [11, 11, 10], min_replicas=2, current_phy2log=current)
    assert bool((again.logcnt >= 2).all())
    assert again.moved.tolist() == [10, 10]  # refilled the empty slots only
    assert torch.equal(again.phy2log[:, :22], plan.phy2log[:, :22])


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((torch.ones(2, 16), 30, 4, 2, 4), "num_replicas"),  # not a multiple of num_gpus
        ((torch.ones(2, 16), 12, 4, 2, 4), "num_replicas"),  # fewer slots than experts
        ((torch.ones(2, 16), 32, 5, 1, 4), "num_groups"),  # does not divide the experts
        ((torch.ones(2, 16), 32, 4, 2, 3), "num_replicas"),
        ((torch.ones(2, 16), 32, 4, 4, 6), "num_replicas"),
        ((torch.ones(2, 16), 32, 4, 0, 4), "num_nodes"),
        ((torch.ones(16), 32, 4, 2, 4), "weight"),
        ((-torch.ones(2, 16), 32, 4, 2, 4), "weight"),
        ((torch.full((2, 16), float("nan")), 32, 4, 2, 4), "weight"),
    ],
)
def test_bad_arguments_are_refused_by_name(args, name) -> None:
    with pytest.raises(ValueError, match=name):
        rebalance_experts(*args)


def test_bad_router_arguments_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        plan_shards(torch.ones(1, 8), [8, 8], min_replicas=3)
    with pytest.raises(ValueError, match="slots_per_shard"):
        plan_shards(torch.ones(1, 8), [4, 3], min_replicas=1)
    with pytest.raises(ValueError, match="current_phy2log"):
        plan_shards(torch.ones(1, 8), [8, 8], current_phy2log=torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="current_phy2log"):
        migrate_experts(torch.ones(1, 8), torch.full((1, 8), 9), 2, 1, 2)
