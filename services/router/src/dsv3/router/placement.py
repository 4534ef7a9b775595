"""Expert placement: which shard holds which (layer, expert) slot. Pure functions, no I/O.

Every slot gets one copy before any slot gets a second (so capacity goes to coverage first), copies of
one slot always land on distinct shards, each shard is filled towards an even share, and slots a shard
already holds are kept where the even share allows (a re-plan moves few slots).
"""

from __future__ import annotations

import dataclasses
import math

Slot = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class ShardCapacity:
    address: str
    capacity: int
    held: frozenset[Slot] = frozenset()


@dataclasses.dataclass(frozen=True)
class Plan:
    slots_of: dict[str, frozenset[Slot]]  # shard address -> slots it should hold

    def holders(self, slot: Slot) -> list[str]:
        return sorted(a for a, s in self.slots_of.items() if slot in s)

    def uncovered(self, slots: list[Slot]) -> list[Slot]:
        return [s for s in slots if not self.holders(s)]


def plan(slots: list[Slot], shards: list[ShardCapacity], replicas: int) -> Plan:
    """Place `replicas` copies of every slot (fewer when shards or capacity run out)."""
    if not shards:
        return Plan({})
    copies = min(replicas, len(shards))
    wanted = min(len(slots) * copies, sum(s.capacity for s in shards))
    share = math.ceil(wanted / len(shards))
    assigned: dict[str, list[Slot]] = {s.address: [] for s in shards}
    capacity = {s.address: min(s.capacity, share) for s in shards}
    count: dict[Slot, int] = dict.fromkeys(slots, 0)
    wanted_set = set(slots)
    for index, shard in enumerate(shards):  # keep what is there, up to the even share and `copies` a slot
        kept = sorted(shard.held & wanted_set)
        start = index * len(kept) // len(shards)  # shards holding the same slots keep different ones first
        for slot in kept[start:] + kept[:start]:
            if len(assigned[shard.address]) < capacity[shard.address] and count[slot] < copies:
                assigned[shard.address].append(slot)
                count[slot] += 1
    for spill in (False, True):  # fill to the even share first, then to the shards' full capacity
        if spill:
            capacity = {s.address: s.capacity for s in shards}
        for copy in range(copies):
            for slot in slots:
                if count[slot] > copy:
                    continue
                free = [a for a in assigned if len(assigned[a]) < capacity[a] and slot not in assigned[a]]
                if not free:
                    continue
                best = min(free, key=lambda a: (len(assigned[a]), a))
                assigned[best].append(slot)
                count[slot] += 1
    return Plan({a: frozenset(s) for a, s in assigned.items()})


def balancedness(loads: list[float]) -> float:
    """max / mean of the loads (1.0 is perfect balance; 1.0 when there is no load at all)."""
    if not loads or sum(loads) == 0:
        return 1.0
    return max(loads) / (sum(loads) / len(loads))
