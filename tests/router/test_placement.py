"""The router's placement tables: slot counts from capacities (coverage first, even spread, redundancy
where slots allow), shard sets <-> planner tables, balancedness of a map, and a re-plan that keeps slots."""

from __future__ import annotations

import torch

from dsv3.balance.placement import plan_shards
from dsv3.router.placement import balancedness, from_table, map_balancedness, slot_layout, to_table

LAYERS = [1, 2]


def test_layout_two_copies_spread_evenly_when_capacity_allows() -> None:
    layout = slot_layout([32, 32, 32], layers=2, experts=16, replicas=2, redundant=0)
    assert layout.sizes == [11, 11, 10] and layout.min_copies == 2
    extra = slot_layout([32, 32, 32], layers=2, experts=16, replicas=2, redundant=4)
    assert extra.sizes == [12, 12, 12] and extra.min_copies == 2


def test_layout_covers_first_when_capacity_is_short() -> None:
    layout = slot_layout([20, 20], layers=2, experts=16, replicas=2, redundant=0)
    assert layout.sizes == [10, 10] and layout.min_copies == 1  # one copy each, 4 busiest get a second
    assert slot_layout([16], layers=2, experts=16, replicas=2, redundant=0) is None  # 8 per layer < 16
    single = slot_layout([32], layers=2, experts=16, replicas=2, redundant=8)
    assert single.sizes == [16] and single.min_copies == 1  # one shard: one copy, never two on it


def test_tables_round_trip_and_empty_slots() -> None:
    held = [{(1, 0), (1, 3), (2, 5)}, {(2, 1)}]
    table = to_table(held, [2, 2], LAYERS)
    assert table.tolist() == [[0, 3, -1, -1], [5, -1, 1, -1]]
    full = torch.tensor([[0, 3, 2, 1], [5, 4, 1, 0]])
    assert from_table(full, [2, 2], LAYERS) == [
        frozenset({(1, 0), (1, 3), (2, 5), (2, 4)}),
        frozenset({(1, 2), (1, 1), (2, 1), (2, 0)}),
    ]


def test_map_balancedness_splits_load_over_copies() -> None:
    load = torch.tensor([[10.0, 2.0], [0.0, 0.0]])
    one_layer = [1, 2]
    held = [{(1, 0)}, {(1, 0), (1, 1)}]  # expert 0: 5 + 5, expert 1: 2 -> loads 5, 7
    value = map_balancedness(load, held, one_layer)
    assert abs(value - ((7 / 6) + 1.0) / 2) < 1e-9  # the idle layer counts as balanced
    assert balancedness([1, 1, 1]) == 1.0 and balancedness([2, 1, 0]) == 2.0 and balancedness([]) == 1.0


def test_a_new_shard_takes_slots_and_the_others_keep_theirs() -> None:
    before = slot_layout([32, 32], 2, 16, 2, 0)
    first = plan_shards(torch.zeros(2, 16), before.sizes, before.min_copies)
    held = from_table(first.phy2log, before.sizes, LAYERS)
    after = slot_layout([32, 32, 32], 2, 16, 2, 0)
    current = to_table([*held, set()], after.sizes, LAYERS)
    plan = plan_shards(torch.zeros(2, 16), after.sizes, after.min_copies, current)
    new = from_table(plan.phy2log, after.sizes, LAYERS)
    assert all(sum((layer, e) in s for s in new) == 2 for layer in LAYERS for e in range(16))
    assert new[0] <= held[0] and new[1] <= held[1]  # old shards only drop copies
    assert int(plan.moved.sum()) == len(new[2]) == 20
