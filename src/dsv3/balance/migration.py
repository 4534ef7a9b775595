"""The migration-aware mode of the planner: a new placement close to a fresh plan's balance that changes
few of the slots the shards hold now (every changed slot is a weight load on some shard).

Per layer, cheapest first:
1. the current placement, if under the new load its busiest shard is within `tolerance` of the fresh
   plan's busiest: nothing moves;
2. otherwise repair it: copy counts become the fresh plan's, surplus copies are freed from the busiest
   shards, missing copies go to the freed slots (heaviest copy to the least loaded shard without that
   expert), then `swap_down` trades copies only until the layer is within tolerance;
3. if that still misses, the fresh plan, with every expert a shard keeps left in the slot it is in.
An entry of -1 in the current placement is an empty slot (a shard that just joined).
"""

from __future__ import annotations

import torch

from dsv3.balance.packing import Layout, shard_loads, swap_down


def _holds(slot_expert_LP: torch.Tensor, layout: Layout, experts: int) -> torch.Tensor:
    layers = slot_expert_LP.shape[0]
    holds_LES = torch.zeros(layers, experts + 1, layout.num_shards, dtype=torch.bool)
    index = torch.where(slot_expert_LP < 0, experts, slot_expert_LP)
    holds_LES[torch.arange(layers)[:, None], index, layout.shard_P[None, :]] = True
    return holds_LES[:, :experts]


def _counts(slot_expert_LP: torch.Tensor, experts: int) -> torch.Tensor:
    index = torch.where(slot_expert_LP < 0, experts, slot_expert_LP)
    out = torch.zeros(slot_expert_LP.shape[0], experts + 1, dtype=torch.int64)
    return out.scatter_add_(1, index, torch.ones_like(index))[:, :experts]


def _first_flags(slot_expert_LP: torch.Tensor) -> torch.Tensor:
    """True at the lowest slot of each expert (its first copy, which stays on its node)."""
    _layers, slots = slot_expert_LP.shape
    key_LP = slot_expert_LP * slots + torch.arange(slots)
    order_LP = key_LP.sort(1).indices
    sorted_LP = slot_expert_LP.gather(1, order_LP)
    lead_LP = torch.ones_like(sorted_LP, dtype=torch.bool)
    lead_LP[:, 1:] = sorted_LP[:, 1:] != sorted_LP[:, :-1]
    return torch.zeros_like(lead_LP).scatter_(1, order_LP, lead_LP)


def _repair_layer(
    w: list[float], current: list[int], count: list[int], shard_P: list[int], firsts: list[bool]
) -> list[int] | None:
    """Current slots with counts changed to `count` by freeing and refilling slots; None if stuck."""
    slots = list(current)
    shards = max(shard_P) + 1
    have = [0] * len(w)
    held = [set() for _ in range(shards)]
    shard_load = [0.0] * shards
    for p, e in enumerate(slots):
        if e >= 0:
            have[e] += 1
            held[shard_P[p]].add(e)
            shard_load[shard_P[p]] += w[e] / count[e]
    for e in range(len(w)):
        surplus = have[e] - count[e]
        if surplus <= 0:
            continue
        mine = [p for p, x in enumerate(slots) if x == e and not firsts[p]]
        mine.sort(key=lambda p: (-shard_load[shard_P[p]], p))
        for p in mine[:surplus]:
            slots[p] = -1
            held[shard_P[p]].discard(e)
            shard_load[shard_P[p]] -= w[e] / count[e]
    missing = [e for e in range(len(w)) for _ in range(max(0, count[e] - have[e]))]
    missing.sort(key=lambda e: (-w[e] / count[e], e))
    for e in missing:
        free = [p for p, x in enumerate(slots) if x < 0 and e not in held[shard_P[p]]]
        if not free:
            return None
        p = min(free, key=lambda p: (shard_load[shard_P[p]], p))
        slots[p] = e
        held[shard_P[p]].add(e)
        shard_load[shard_P[p]] += w[e] / count[e]
    return slots if all(x >= 0 for x in slots) else None


def _align(current: list[int], fresh: list[int], layout: Layout) -> list[int]:
    """`fresh` with each shard's experts that it already holds kept in the slot they occupy now."""
    out = list(fresh)
    for s, (start, size) in enumerate(zip(layout.start_S.tolist(), layout.slots_S.tolist(), strict=True)):
        del s
        old, new = current[start : start + size], fresh[start : start + size]
        keep = set(old) & set(new)
        rest = [e for e in new if e not in keep]
        row = [e if e in keep else None for e in old]
        for i, e in enumerate(row):
            if e is None:
                row[i] = rest.pop(0)
        out[start : start + size] = row
    return out


def migrate(
    w_LE: torch.Tensor,
    current_LP: torch.Tensor,
    fresh_LP: torch.Tensor,
    fresh_count_LE: torch.Tensor,
    layout: Layout,
    hierarchical: bool,
    min_count: int,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert of each slot [L, P], copies [L, E], slots changed [L])."""
    _layers, experts = w_LE.shape
    target_L = shard_loads(w_LE, fresh_count_LE, fresh_LP, layout).max(1).values * (1 + tolerance)
    count_LE = _counts(current_LP, experts)
    holds_LES = _holds(current_LP, layout, experts)
    complete_L = (current_LP >= 0).all(1) & (count_LE >= min_count).all(1)
    complete_L &= holds_LES.sum(2).eq(count_LE).all(1)  # no expert twice on a shard
    safe_LP = current_LP.clamp_min(0)
    top_L = shard_loads(w_LE, count_LE, safe_LP, layout).max(1).values
    keep_L = complete_L & (top_L <= target_L)

    out_LP = current_LP.clone()
    out_count_LE = count_LE.clone()
    todo = (~keep_L).nonzero().flatten().tolist()
    shard_P = layout.shard_P.tolist()
    repaired, fallback = [], []
    firsts_LP = _first_flags(safe_LP) if hierarchical else torch.zeros_like(current_LP, dtype=torch.bool)
    for layer in todo:
        slots = _repair_layer(
            w_LE[layer].tolist(),
            current_LP[layer].tolist(),
            fresh_count_LE[layer].tolist(),
            shard_P,
            firsts_LP[layer].tolist(),
        )
        if slots is None:
            fallback.append(layer)
        else:
            out_LP[layer] = torch.tensor(slots)
            out_count_LE[layer] = fresh_count_LE[layer]
            repaired.append(layer)
    if repaired:
        idx = torch.tensor(repaired)
        sub_LP = out_LP[idx].clone()
        first_LP = _first_flags(sub_LP) if hierarchical else torch.zeros_like(sub_LP, dtype=torch.bool)
        swap_down(
            w_LE[idx], out_count_LE[idx], sub_LP, first_LP, layout, hierarchical, target_L=target_L[idx]
        )
        out_LP[idx] = sub_LP
        top_L = shard_loads(w_LE[idx], out_count_LE[idx], sub_LP, layout).max(1).values
        fallback += [
            layer for layer, ok in zip(repaired, (top_L <= target_L[idx]).tolist(), strict=True) if not ok
        ]
    for layer in fallback:
        out_LP[layer] = torch.tensor(_align(current_LP[layer].tolist(), fresh_LP[layer].tolist(), layout))
        out_count_LE[layer] = fresh_count_LE[layer]
    moved_L = (_holds(out_LP, layout, experts) & ~holds_LES).sum((1, 2))
    return out_LP, out_count_LE, moved_L
