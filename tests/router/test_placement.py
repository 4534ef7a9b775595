"""Placement plans: coverage before redundancy, distinct shards per copy, even spread, few moves."""

from __future__ import annotations

from dsv3.router.placement import ShardCapacity, balancedness, plan

SLOTS = [(layer, e) for layer in (1, 2) for e in range(16)]


def _copies(result, slot) -> int:
    return len(result.holders(slot))


def test_two_copies_on_distinct_shards_when_capacity_allows() -> None:
    result = plan(SLOTS, [ShardCapacity(f"s{i}", 32) for i in range(3)], replicas=2)
    assert all(_copies(result, s) == 2 for s in SLOTS)  # holders() is a set of shards: distinct
    sizes = sorted(len(v) for v in result.slots_of.values())
    assert sizes == [21, 21, 22]


def test_coverage_first_when_capacity_is_short() -> None:
    result = plan(SLOTS, [ShardCapacity("a", 20), ShardCapacity("b", 20)], replicas=2)
    assert result.uncovered(SLOTS) == []  # every expert once (32 slots) before any second copy (8)
    assert sum(_copies(result, s) == 2 for s in SLOTS) == 8
    assert plan(SLOTS, [ShardCapacity("a", 10)], replicas=2).uncovered(SLOTS) == SLOTS[10:]


def test_replan_keeps_most_slots_where_they_are() -> None:
    before = plan(SLOTS, [ShardCapacity("a", 32), ShardCapacity("b", 32)], replicas=2)
    held = [ShardCapacity(a, 32, s) for a, s in before.slots_of.items()] + [ShardCapacity("c", 32)]
    after = plan(SLOTS, held, replicas=2)
    assert all(_copies(after, s) == 2 for s in SLOTS)
    moved = sum(len(after.slots_of[a] - before.slots_of[a]) for a in ("a", "b"))
    assert moved == 0  # the new shard takes copies; the old ones only drop some
    assert len(after.slots_of["c"]) >= 20
    assert balancedness([1, 1, 1]) == 1.0 and balancedness([2, 1, 0]) == 2.0 and balancedness([]) == 1.0
