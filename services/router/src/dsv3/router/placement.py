"""The router's side of expert placement: shard slots <-> the planner's tables. Pure functions, no I/O.

The planner (`dsv3.balance.placement.plan_shards`) works per MoE layer on a physical-slot table
[L, P] where shard i owns a contiguous range of `sizes[i]` slots. The router knows shards as sets of
(layer, expert) it holds and a capacity over all layers. These functions size the table from the
capacities and the redundancy asked for, and convert both ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

Slot = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    sizes: list[int]  # slots per MoE layer on each shard (same order as the shards given)
    min_copies: int  # copies every expert gets before the busiest get more


def slot_layout(
    capacities: Sequence[int], layers: int, experts: int, replicas: int, redundant: int
) -> SlotLayout | None:
    """Per-layer slot counts for shards of these capacities (slots over all layers), or None when they
    cannot hold one copy of every expert. Every expert gets `replicas` copies where the shards allow
    (never two on one shard), plus `redundant` copies per layer for the busiest experts; the slots
    are spread as evenly as the capacities allow."""
    caps = [min(c // layers, experts) for c in capacities]
    copies = min(replicas, len(caps))
    total = min(sum(caps), copies * experts + redundant)
    if total < experts:
        return None
    sizes = [0] * len(caps)
    left = total
    while left:  # water-filling: one slot at a time to the emptiest shard with room
        open_ = [i for i in range(len(caps)) if sizes[i] < caps[i]]
        i = min(open_, key=lambda j: (sizes[j], j))
        sizes[i] += 1
        left -= 1
    return SlotLayout(sizes, max(1, min(copies, total // experts, sum(1 for s in sizes if s))))


def to_table(
    held: Sequence[set[Slot] | frozenset[Slot]], sizes: Sequence[int], layers: Sequence[int]
) -> torch.Tensor:
    """The [L, P] table of what each shard holds now (-1: an empty slot). A shard holding more than its
    new size keeps the experts with the fewest copies kept so far, so shrinking keeps coverage."""
    table = torch.full((len(layers), sum(sizes)), -1, dtype=torch.int64)
    for row, layer in enumerate(layers):
        kept: dict[int, int] = {}
        start = 0
        for slots, size in zip(held, sizes, strict=True):
            mine = sorted((e for l, e in slots if l == layer), key=lambda e: (kept.get(e, 0), e))[:size]
            for e in mine:
                kept[e] = kept.get(e, 0) + 1
            table[row, start : start + len(mine)] = torch.tensor(sorted(mine), dtype=torch.int64)
            start += size
    return table


def from_table(
    phy2log_LP: torch.Tensor, sizes: Sequence[int], layers: Sequence[int]
) -> list[frozenset[Slot]]:
    """The (layer, expert) set of each shard in a planner table."""
    out, start = [], 0
    rows = phy2log_LP.tolist()
    for size in sizes:
        out.append(
            frozenset(
                (layer, e) for layer, row in zip(layers, rows, strict=True) for e in row[start : start + size]
            )
        )
        start += size
    return out


def map_balancedness(
    load_LE: torch.Tensor, held: Sequence[set[Slot] | frozenset[Slot]], layers: Sequence[int]
) -> float:
    """Mean over layers of max / mean shard load, each expert's load split evenly over its holders."""
    if not held:
        return 1.0
    values = []
    for row, layer in enumerate(layers):
        copies: dict[int, int] = {}
        for slots in held:
            for l, e in slots:
                if l == layer:
                    copies[e] = copies.get(e, 0) + 1
        loads = [sum(float(load_LE[row, e]) / copies[e] for l, e in slots if l == layer) for slots in held]
        values.append(balancedness(loads))
    return sum(values) / len(values)


def balancedness(loads: list[float]) -> float:
    """max / mean of the loads (1.0 is perfect balance; 1.0 when there is no load at all)."""
    if not loads or sum(loads) == 0:
        return 1.0
    return max(loads) / (sum(loads) / len(loads))
