"""Redundant-expert placement: how many copies of each routed expert, and which shard (GPU) holds each.

`rebalance_experts` has exactly the interface and meaning of DeepSeek's EPLB (weight [layers, experts]
of observed load; physical slot p lives on GPU p // (num_replicas // num_gpus); log2phy padded with -1),
so the two can be run on the same inputs. It differs in what it returns:
- two copies of one expert never share a GPU (a second copy there would add no capacity);
- hierarchical mode (expert groups divide over the nodes) packs groups to nodes and keeps every expert's
  first copy on its group's node, but the redundant copies go wherever the load needs them, so a node
  with hot groups gets more spare slots than a cold one;
- copies are placed longest-first onto the least-loaded GPU and then improved by local search
  (`dsv3.balance.packing`), all vectorised over layers.

`migrate_experts` is the migration-aware mode: given the current placement it returns one whose balance
is within `tolerance` of a fresh plan's while changing as few slots as it can (`dsv3.balance.migration`),
and how many it changed. `plan_shards` is the form a serving router uses: any number of slots per shard
(shards of one node), a minimum number of copies per expert (fault tolerance), the same two modes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from dsv3.balance import migration
from dsv3.balance.packing import (
    Layout,
    fix_duplicates,
    longest_first,
    replica_counts,
    shard_loads,
    swap_down,
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A placement: the expert of every physical slot, copies per expert, slots changed from `current`."""

    phy2log: torch.Tensor  # int64 [L, P]
    log2phy: torch.Tensor  # int64 [L, E, max copies], -1 padded
    logcnt: torch.Tensor  # int64 [L, E]
    moved: torch.Tensor  # int64 [L] slots whose expert changed (all slots of a fresh plan)
    balancedness: torch.Tensor  # float64 [L] max / mean shard load under the weight


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"weight must be a non-empty [layers, experts] tensor, got {getattr(weight, 'shape', weight)}"
        )
    w = weight.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weight must be finite and >= 0")
    idle_L = w.sum(1, keepdim=True) == 0
    return torch.where(idle_L, torch.ones_like(w), w)  # no load seen: plan as if every expert were equal


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _log2phy(phy2log_LP: torch.Tensor, count_LE: torch.Tensor) -> torch.Tensor:
    """For each expert its slots in ascending order, padded with -1 to the largest count."""
    layers, experts = count_LE.shape
    slots = phy2log_LP.shape[1]
    width = int(count_LE.max())
    order_LP = torch.sort(phy2log_LP * slots + torch.arange(slots), dim=1).indices  # by expert, then slot
    start_LE = torch.cumsum(count_LE, 1) - count_LE
    rank_LP = torch.empty_like(phy2log_LP)
    sorted_expert_LP = phy2log_LP.gather(1, order_LP)
    rank_LP.scatter_(
        1, order_LP, torch.arange(slots).expand(layers, slots) - start_LE.gather(1, sorted_expert_LP)
    )
    out = torch.full((layers, experts * width), -1, dtype=torch.int64)
    out.scatter_(1, phy2log_LP * width + rank_LP, torch.arange(slots).expand(layers, slots).contiguous())
    return out.view(layers, experts, width)


def _group_homes(w_LE: torch.Tensor, num_groups: int, num_nodes: int) -> torch.Tensor:
    """Node of every expert [L, E]: whole groups packed to nodes, heaviest group first onto the lightest
    node that still has room for a group."""
    layers, experts = w_LE.shape
    per_node = num_groups // num_nodes
    group_load_LG = w_LE.view(layers, num_groups, -1).sum(-1)
    order_LG = torch.sort(group_load_LG, dim=1, descending=True, stable=True).indices
    node_load_LN = torch.zeros(layers, num_nodes, dtype=w_LE.dtype)
    node_fill_LN = torch.zeros(layers, num_nodes, dtype=torch.int64)
    node_of_group_LG = torch.empty(layers, num_groups, dtype=torch.int64)
    rows = torch.arange(layers)
    for i in range(num_groups):
        group_L = order_LG[:, i]
        cost_LN = torch.where(node_fill_LN < per_node, node_load_LN, float("inf"))
        node_L = cost_LN.argmin(1)
        node_of_group_LG[rows, group_L] = node_L
        node_load_LN[rows, node_L] += group_load_LG[rows, group_L]
        node_fill_LN[rows, node_L] += 1
    return node_of_group_LG.repeat_interleave(experts // num_groups, dim=1)


def _fresh(
    w_LE: torch.Tensor, layout: Layout, home_LE: torch.Tensor | None, min_count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert of each slot [L, P], copies [L, E], first-copy flags [L, P]) planned from scratch."""
    w_LE = w_LE.float()  # float32 packs the same plans measurably faster than float64
    count_LE = replica_counts(w_LE, layout.num_slots, min_count, layout.num_shards)
    slot_expert_LP, first_LP = longest_first(w_LE, count_LE, layout, home_LE)
    if not bool(fix_duplicates(slot_expert_LP, first_LP, layout).all()):
        raise ValueError("num_replicas: cannot place the copies without two of one expert on one GPU")
    swap_down(w_LE, count_LE, slot_expert_LP, first_LP, layout, hierarchical=home_LE is not None)
    return slot_expert_LP, count_LE, first_LP


def balancedness(w_LE: torch.Tensor, phy2log_LP: torch.Tensor, layout: Layout) -> torch.Tensor:
    """max / mean shard load per layer [L] (1.0 is perfect) when each expert's load splits evenly."""
    count_LE = torch.zeros_like(w_LE, dtype=torch.int64).scatter_add_(
        1, phy2log_LP, torch.ones_like(phy2log_LP)
    )
    load_LS = shard_loads(w_LE, count_LE, phy2log_LP, layout)
    mean_L = load_LS.mean(1)
    return torch.where(mean_L > 0, load_LS.max(1).values / mean_L.clamp_min(1e-300), 1.0)


def _plan(
    w_LE: torch.Tensor,
    layout: Layout,
    home_LE: torch.Tensor | None,
    min_count: int,
    current: torch.Tensor | None,
    tolerance: float,
) -> Plan:
    layers, slots = w_LE.shape[0], layout.num_slots
    slot_expert_LP, count_LE, _first_LP = _fresh(w_LE, layout, home_LE, min_count)
    if current is None:
        moved_L = torch.full((layers,), slots, dtype=torch.int64)
    else:
        slot_expert_LP, count_LE, moved_L = migration.migrate(
            w_LE, current, slot_expert_LP, count_LE, layout, home_LE is not None, min_count, tolerance
        )
    return Plan(
        slot_expert_LP,
        _log2phy(slot_expert_LP, count_LE),
        count_LE,
        moved_L,
        balancedness(w_LE, slot_expert_LP, layout),
    )


def _eplb_layout(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, Layout, torch.Tensor | None]:
    _positive(num_replicas=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus)
    w_LE = _check_weight(weight)
    experts = w_LE.shape[1]
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_replicas < experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of experts ({experts})")
    if num_replicas > experts * num_gpus:
        raise ValueError(
            f"num_replicas ({num_replicas}) exceeds one copy of each expert per GPU ({experts * num_gpus})"
        )
    if experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts ({experts})")
    hierarchical = num_groups % num_nodes == 0 and num_nodes > 1
    if hierarchical and num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    nodes = num_nodes if hierarchical else 1
    per_gpu = num_replicas // num_gpus
    layout = Layout(
        torch.full((num_gpus,), per_gpu, dtype=torch.int64),
        torch.arange(num_gpus) // (num_gpus // nodes),
        nodes,
    )
    home_LE = _group_homes(w_LE, num_groups, num_nodes) if hierarchical else None
    return w_LE, layout, home_LE


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's entry point: (phy2log [L, num_replicas], log2phy [L, E, X] -1 padded, logcnt [L, E])."""
    w_LE, layout, home_LE = _eplb_layout(weight, num_replicas, num_groups, num_nodes, num_gpus)
    plan = _plan(w_LE, layout, home_LE, 1, None, 0.0)
    return plan.phy2log, plan.log2phy, plan.logcnt


def migrate_experts(
    weight: torch.Tensor,
    current_phy2log: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    tolerance: float = 0.02,
) -> Plan:
    """A placement for `weight` within (1 + tolerance) x a fresh plan's max shard load per layer, that
    changes as few of `current_phy2log`'s slots as it finds (`Plan.moved` counts them per layer)."""
    if not isinstance(current_phy2log, torch.Tensor) or current_phy2log.dim() != 2:
        raise ValueError("current_phy2log must be a [layers, num_replicas] tensor")
    w_LE, layout, home_LE = _eplb_layout(weight, current_phy2log.shape[1], num_groups, num_nodes, num_gpus)
    current = _check_current(current_phy2log, w_LE.shape, layout)
    return _plan(w_LE, layout, home_LE, 1, current, _check_tolerance(tolerance))


def plan_shards(
    weight: torch.Tensor,
    slots_per_shard: Sequence[int],
    min_replicas: int = 1,
    current_phy2log: torch.Tensor | None = None,
    tolerance: float = 0.02,
) -> Plan:
    """Flat placement over shards with any slot counts (slot p on the shard whose range holds it).

    Every expert gets at least `min_replicas` copies (on distinct shards); the rest follow the load.
    With `current_phy2log` (same slot layout), the migration-aware mode.
    """
    w_LE = _check_weight(weight)
    experts = w_LE.shape[1]
    if not slots_per_shard or any(not isinstance(k, int) or k < 0 for k in slots_per_shard):
        raise ValueError(f"slots_per_shard must be a non-empty list of ints >= 0, got {slots_per_shard!r}")
    _positive(min_replicas=min_replicas)
    slots, shards = sum(slots_per_shard), len(slots_per_shard)
    if min_replicas > shards:
        raise ValueError(f"min_replicas ({min_replicas}) exceeds the number of shards ({shards})")
    if slots < min_replicas * experts:
        raise ValueError(f"slots_per_shard: {slots} slots for {min_replicas} x {experts} experts")
    if any(k > experts for k in slots_per_shard) or slots > experts * shards:
        raise ValueError("slots_per_shard: a shard cannot hold more slots than there are experts")
    layout = Layout(
        torch.tensor(list(slots_per_shard), dtype=torch.int64), torch.zeros(shards, dtype=torch.int64), 1
    )
    current = None if current_phy2log is None else _check_current(current_phy2log, w_LE.shape, layout, True)
    return _plan(w_LE, layout, None, min_replicas, current, _check_tolerance(tolerance))


def _check_tolerance(tolerance: float) -> float:
    if not 0 <= tolerance < 10:
        raise ValueError(f"tolerance must be in [0, 10), got {tolerance}")
    return float(tolerance)


def _check_current(
    current: torch.Tensor, shape: torch.Size, layout: Layout, empty_ok: bool = False
) -> torch.Tensor:
    layers, experts = shape
    if tuple(current.shape) != (layers, layout.num_slots) or current.is_floating_point():
        raise ValueError(
            f"current_phy2log must be an integer [{layers}, {layout.num_slots}] tensor, "
            f"got {current.dtype} {list(current.shape)}"
        )
    current = current.to("cpu", torch.int64)
    if bool((current < (-1 if empty_ok else 0)).any()) or bool((current >= experts).any()):
        low = "-1 (empty)" if empty_ok else "0"
        raise ValueError(f"current_phy2log: expert ids must lie in [{low}, {experts})")
    return current
