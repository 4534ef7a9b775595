"""The placement planner's packing steps, vectorised over layers (torch only, no Python loop per layer).

Three steps, each a function of plain tensors (L layers, E experts, S shards, P physical slots):
- `replica_counts`: how many copies of each expert; each extra copy goes to the expert whose copies
  carry the most load each (this minimises the largest per-copy load), never more copies than shards.
- `longest_first`: copies sorted by load, each onto the least loaded shard that has a free slot and does
  not hold that expert yet (longest processing time first, with the exclusion). In the hierarchical
  layout an expert's first copy must stay on its group's node, and the other copies may go to any node
  with room left beyond the first copies it still owes: spare slots follow the load, not the node count.
- `swap_down`: local search. Per layer, the busiest shard trades one copy with a copy on another shard
  when that lowers the larger of the two shards' loads below the old maximum; repeated until no trade
  helps (or `target_L` is reached, which is how the migration-aware mode stops early).
"""

from __future__ import annotations

import dataclasses

import torch

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where physical slots live: shard s holds slots start_S[s] .. start_S[s] + slots_S[s] - 1."""

    slots_S: torch.Tensor  # int64 [S]
    node_S: torch.Tensor  # int64 [S] node of each shard (all 0 for a flat layout)
    num_nodes: int

    @property
    def num_shards(self) -> int:
        return int(self.slots_S.numel())

    @property
    def num_slots(self) -> int:
        return int(self.slots_S.sum())

    @property
    def start_S(self) -> torch.Tensor:
        return torch.cumsum(self.slots_S, 0) - self.slots_S

    @property
    def shard_P(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.num_shards), self.slots_S)


def replica_counts(w_LE: torch.Tensor, num_slots: int, min_count: int, max_count: int) -> torch.Tensor:
    """Copies per expert [L, E] summing to `num_slots`: `min_count` each, then one at a time to the
    expert with the largest load per copy (ties: the lowest expert id)."""
    layers, experts = w_LE.shape
    count_LE = torch.full((layers, experts), min_count, dtype=torch.int64)
    rows = torch.arange(layers)
    for _ in range(num_slots - min_count * experts):
        per_copy_LE = (w_LE / count_LE).masked_fill(count_LE >= max_count, -INF)
        count_LE[rows, per_copy_LE.argmax(1)] += 1
    return count_LE


def longest_first(
    w_LE: torch.Tensor, count_LE: torch.Tensor, layout: Layout, home_LE: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies onto shards, heaviest first. Returns (expert of each slot [L, P], first-copy flag [L, P]).

    A copy that finds no shard free of its expert (rare: only the last few copies can) takes any free
    slot; `fix_duplicates` resolves it afterwards.
    """
    layers, experts = w_LE.shape
    slots = layout.num_slots
    rows = torch.arange(layers)
    end_LE = torch.cumsum(count_LE, 1)
    starts_LP = torch.zeros(layers, slots + 1, dtype=torch.int64)  # +1 where the next expert's copies begin
    starts_LP.scatter_add_(1, end_LE[:, :-1], torch.ones_like(end_LE[:, :-1]))
    copy_expert_LP = torch.cumsum(starts_LP[:, :slots], 1)
    rank_LP = torch.arange(slots) - (end_LE - count_LE).gather(1, copy_expert_LP)
    load_LP = (w_LE / count_LE).gather(1, copy_expert_LP)
    order_LP = torch.sort(load_LP, dim=1, descending=True, stable=True).indices  # first copies lead ties
    copy_expert_LP = copy_expert_LP.gather(1, order_LP)
    first_LP = rank_LP.gather(1, order_LP) == 0
    load_LP = load_LP.gather(1, order_LP)

    num_shards = layout.num_shards
    shard_load_LS = torch.zeros(layers, num_shards, dtype=w_LE.dtype)
    free_LS = layout.slots_S.expand(layers, num_shards).clone()
    full_LS = torch.where(free_LS > 0, 0.0, INF).to(w_LE.dtype)  # added to the load: a full shard never wins
    holds_LES = torch.zeros(layers, experts, num_shards, dtype=torch.bool)
    slot_expert_LP = torch.full((layers, slots), -1, dtype=torch.int64)
    slot_first_LP = torch.zeros(layers, slots, dtype=torch.bool)
    start_S, slots_S, node_S = layout.start_S, layout.slots_S, layout.node_S
    if home_LE is not None:
        home_LP = home_LE.gather(1, copy_expert_LP)
        node_free_LN = torch.zeros(layers, layout.num_nodes, dtype=torch.int64)
        node_free_LN.index_add_(1, node_S, free_LS)
        owed_LN = torch.zeros(layers, layout.num_nodes, dtype=torch.int64)  # first copies still to place
        owed_LN.scatter_add_(1, home_LE, torch.ones_like(home_LE))
    # flat views: 1-D index ops cost a fraction of 2-D advanced indexing, and this loop is all index ops
    load_flat, free_flat, full_flat = shard_load_LS.view(-1), free_LS.view(-1), full_LS.view(-1)
    holds_flat, holds_rows = holds_LES.view(-1), holds_LES.view(layers * experts, num_shards)
    expert_flat, first_flat = slot_expert_LP.view(-1), slot_first_LP.view(-1)
    row_S, row_E, row_P = rows * num_shards, rows * experts, rows * slots
    for i in range(slots):
        expert_L, first_L = copy_expert_LP[:, i], first_LP[:, i]
        open_LS = shard_load_LS + full_LS
        if home_LE is not None:
            no_spare_LS = (node_free_LN - owed_LN)[:, node_S] <= 0
            away_LS = node_S[None, :] != home_LP[:, i, None]
            open_LS = open_LS.masked_fill(torch.where(first_L[:, None], away_LS, no_spare_LS), INF)
        cost_LS = open_LS.masked_fill(holds_rows.index_select(0, row_E + expert_L), INF)
        shard_L = cost_LS.argmin(1)
        flat_L = row_S + shard_L
        if bool(torch.isinf(cost_LS.view(-1).take(flat_L)).any()):  # no shard free of it: any free one
            stuck_L = torch.isinf(cost_LS.view(-1).take(flat_L))
            blocked_L = torch.isinf(open_LS).all(1, keepdim=True)
            fallback_LS = torch.where(blocked_L, shard_load_LS + full_LS, open_LS)
            shard_L = torch.where(stuck_L, fallback_LS.argmin(1), shard_L)
            flat_L = row_S + shard_L
        load_flat.index_add_(0, flat_L, load_LP[:, i])
        left_L = free_flat.take(flat_L) - 1
        free_flat.index_copy_(0, flat_L, left_L)
        full_flat.index_copy_(0, flat_L, torch.where(left_L > 0, 0.0, INF).to(w_LE.dtype))
        holds_flat.index_fill_(0, (row_E + expert_L) * num_shards + shard_L, True)
        position_L = row_P + start_S[shard_L] + slots_S[shard_L] - 1 - left_L
        expert_flat.index_copy_(0, position_L, expert_L)
        first_flat.index_copy_(0, position_L, first_L)
        if home_LE is not None:
            node_free_LN[rows, node_S[shard_L]] -= 1
            owed_LN[rows, home_LP[:, i]] -= first_L.long()
    return slot_expert_LP, slot_first_LP


def fix_duplicates(slot_expert_LP: torch.Tensor, slot_first_LP: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Swap copies until no shard holds one expert twice (in place); returns per-layer success [L].

    Only layers that have a duplicate are visited, one Python pass each: they are rare.
    """
    shard_P = layout.shard_P
    node_P = layout.node_S[shard_P]
    layers = slot_expert_LP.shape[0]
    ok_L = torch.ones(layers, dtype=torch.bool)
    pair_LP = shard_P * (int(slot_expert_LP.max()) + 1) + slot_expert_LP
    dup_L = (pair_LP.sort(1).values.diff(dim=1) == 0).any(1)
    for layer in dup_L.nonzero().flatten().tolist():
        experts = slot_expert_LP[layer].tolist()
        firsts = slot_first_LP[layer].tolist()
        shards, nodes = shard_P.tolist(), node_P.tolist()
        held = [set() for _ in range(layout.num_shards)]
        dups = []
        for p, (e, s) in enumerate(zip(experts, shards, strict=True)):
            if e in held[s]:
                dups.append(p)
            held[s].add(e)
        for p in dups:
            e, s = experts[p], shards[p]
            for q, (f, t) in enumerate(zip(experts, shards, strict=True)):
                if t == s or f == e or e in held[t] or f in held[s]:
                    continue
                if (firsts[p] or firsts[q]) and nodes[p] != nodes[q]:
                    continue
                held[t].add(e)
                held[t].discard(f)
                held[s].add(f)  # s still holds e through its other copy
                experts[p], experts[q] = f, e
                firsts[p], firsts[q] = firsts[q], firsts[p]
                break
            else:
                ok_L[layer] = False
        slot_expert_LP[layer] = torch.tensor(experts)
        slot_first_LP[layer] = torch.tensor(firsts)
    return ok_L


def shard_loads(
    w_LE: torch.Tensor, count_LE: torch.Tensor, slot_expert_LP: torch.Tensor, layout: Layout
) -> torch.Tensor:
    """Load of each shard [L, S] when an expert's load splits evenly over its copies."""
    load_LP = (w_LE / count_LE.clamp_min(1)).gather(1, slot_expert_LP)
    out_LS = torch.zeros(w_LE.shape[0], layout.num_shards, dtype=w_LE.dtype)
    return out_LS.index_add_(1, layout.shard_P, load_LP)


def swap_down(
    w_LE: torch.Tensor,
    count_LE: torch.Tensor,
    slot_expert_LP: torch.Tensor,
    slot_first_LP: torch.Tensor,
    layout: Layout,
    hierarchical: bool,
    target_L: torch.Tensor | None = None,
    max_rounds: int = 400,
) -> int:
    """Trade copies between the busiest shard and the others while that lowers its load (in place).

    Returns the number of rounds run. Layers at or under `target_L` (when given), or within 0.1% of
    the best any placement could reach, are left alone.
    """
    layers, experts = w_LE.shape
    shard_P, start_S, slots_S = layout.shard_P, layout.start_S, layout.slots_S
    node_P = layout.node_S[shard_P]
    width = int(slots_S.max())
    rows = torch.arange(layers)
    load_LP = (w_LE / count_LE).gather(1, slot_expert_LP)
    holds_LES = torch.zeros(layers, experts, layout.num_shards, dtype=torch.bool)
    holds_LES[rows[:, None], slot_expert_LP, shard_P[None, :]] = True
    shard_load_LS = torch.zeros(layers, layout.num_shards, dtype=w_LE.dtype).index_add_(1, shard_P, load_LP)
    # no layer can beat its mean shard load or its heaviest copy: stop within 0.1% of that bound
    bound_L = torch.maximum(shard_load_LS.mean(1), load_LP.max(1).values) * (1 + 1e-3)
    target_L = bound_L if target_L is None else torch.maximum(target_L, bound_L)
    active_L = torch.ones(layers, dtype=torch.bool)
    for rounds in range(1, max_rounds + 1):
        top_L, busiest_L = shard_load_LS.max(1)
        active_L &= top_L > target_L
        if not bool(active_L.any()):
            return rounds - 1
        idx = active_L.nonzero().flatten()
        top, busiest = top_L[idx], busiest_L[idx]
        offset_K = torch.arange(width)
        mine_LK = (start_S[busiest][:, None] + offset_K).clamp_max(slot_expert_LP.shape[1] - 1)
        valid_LK = offset_K[None, :] < slots_S[busiest][:, None]
        a_LK = load_LP[idx[:, None], mine_LK]
        ea_LK = slot_expert_LP[idx[:, None], mine_LK]
        b_LP, eb_LP = load_LP[idx], slot_expert_LP[idx]
        other_LP = shard_load_LS[idx][:, shard_P]
        mine_after_LKP = top[:, None, None] - a_LK[:, :, None] + b_LP[:, None, :]
        other_after_LKP = other_LP[:, None, :] - b_LP[:, None, :] + a_LK[:, :, None]
        worst_LKP = torch.maximum(mine_after_LKP, other_after_LKP)
        ok_LKP = valid_LK[:, :, None] & (shard_P[None, None, :] != busiest[:, None, None])
        ok_LKP &= ea_LK[:, :, None] != eb_LP[:, None, :]
        ok_LKP &= ~holds_LES[idx[:, None], ea_LK][:, :, shard_P]  # the other shard lacks a's expert
        ok_LKP &= ~holds_LES[idx[:, None], eb_LP, busiest[:, None]][:, None, :]  # and mine lacks b's
        if hierarchical:
            first_a_LK = slot_first_LP[idx[:, None], mine_LK]
            tied_LKP = first_a_LK[:, :, None] | slot_first_LP[idx][:, None, :]
            same_node_LP = node_P[None, :] == layout.node_S[busiest][:, None]
            ok_LKP &= ~tied_LKP | same_node_LP[:, None, :]
        worst_LKP = torch.where(ok_LKP, worst_LKP, INF)
        best_L, flat_L = worst_LKP.flatten(1).min(1)
        gain_L = best_L < top * (1 - 1e-6)  # a real gain, not float rounding
        if not bool(gain_L.any()):
            active_L[idx] = False
            continue
        active_L[idx[~gain_L]] = False
        idx, flat_L = idx[gain_L], flat_L[gain_L]
        k, q = flat_L // shard_P.numel(), flat_L % shard_P.numel()
        p = mine_LK[gain_L.nonzero().flatten(), k]
        ep, eq = slot_expert_LP[idx, p], slot_expert_LP[idx, q]
        sp, sq = shard_P[p], shard_P[q]
        lp, lq = load_LP[idx, p], load_LP[idx, q]
        slot_expert_LP[idx, p], slot_expert_LP[idx, q] = eq, ep
        load_LP[idx, p], load_LP[idx, q] = lq, lp
        fp, fq = slot_first_LP[idx, p], slot_first_LP[idx, q]
        slot_first_LP[idx, p], slot_first_LP[idx, q] = fq, fp
        shard_load_LS[idx, sp] += lq - lp
        shard_load_LS[idx, sq] += lp - lq
        holds_LES[idx, ep, sp] = False
        holds_LES[idx, eq, sq] = False
        holds_LES[idx, eq, sp] = True
        holds_LES[idx, ep, sq] = True
    return max_rounds
