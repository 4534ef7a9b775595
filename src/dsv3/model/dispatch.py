"""Token dispatch: the seam between the MoE gate and whoever computes the routed experts.

The gate decides (ids, weights) per token; a `TokenDispatcher` moves each token's K rows to the holder
of the chosen experts, grouped by that holder's local expert, together with each row's combine weight
(`dispatch`); the experts compute SwiGLU on the rows and scale their F-wide hidden rows by those weights
(equal to scaling the D-wide outputs, the down projection being linear, and cheaper: F < D); `combine`
brings the rows back and sums each token's K rows. The expert math is the same whichever dispatcher
runs, so one process, expert-parallel training and gRPC expert shards all give the model's output:

- `LocalDispatcher`: every expert in this process (the default).
- `AllToAllDispatcher(group, num_experts)`: expert parallelism over a torch.distributed group; rank r
  of W holds experts [r E/W, (r+1) E/W). Token counts are exchanged first, then rows (and weights) go
  there and back with `all_to_all_single`; both exchanges are differentiable (the backward runs the
  reverse exchange).
- The router's remote dispatcher (expert shards over gRPC) lives in the router service.

Permutation and un-permutation are written once here (`sort_by_expert`, `unpermute_sum`) for every
backend; kernels compute the grouped experts, and for float32 CPU training also the row gather and the
token sum (`ops.permute_rows`, `ops.unpermute_sum`: fused, each other's backward). Shapes follow the
legend in README.md (T tokens, D hidden, E experts, K experts per token, N = T*K dispatched rows, W ranks).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.distributed as dist

from dsv3.kernels import ops
from dsv3.kernels.reference import inverse_permutation  # shared with the fused CPU kernels


@dataclasses.dataclass
class Routing:
    """The gate's decision for T tokens."""

    ids_TK: torch.Tensor  # int64 expert index per (token, choice)
    weights_TK: torch.Tensor  # float32 combine weight per (token, choice)
    scores_TE: torch.Tensor  # float32 sigmoid affinity of every expert (for the balance loss)


class DispatchError(ValueError):
    """A dispatcher was given inputs that do not fit it (shapes, expert ids, group size)."""


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What every dispatcher's handle carries for the experts; each backend adds what its combine needs."""

    row_weights_N: torch.Tensor  # the combine weight of each dispatched row, in row order, experts' side


class TokenDispatcher(Protocol):
    """Moves routed rows to their experts and back."""

    num_experts: int  # routed experts of the whole layer (ids are in [0, num_experts))
    num_local_experts: int  # experts whose rows `dispatch` returns here

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """(rows grouped by local expert [N', D], rows per local expert [num_local_experts] int64, handle);
        `handle.row_weights_N` [N'] are the rows' combine weights, for the experts to apply."""
        ...

    def combine(self, rows_ND: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """The computed (already weighted) rows, in dispatched order, summed into their tokens: y [T, D]."""
        ...


def sort_by_expert(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the N = T*K (token, choice) rows by expert -> (order_N int64, counts_E int64).

    order_N[i] is the flat (token * K + choice) index of the i-th row in expert order; a stable sort keeps
    each expert's rows in token order. Counts come from a search in the sorted ids: no host sync.
    """
    flat_N = ids_TK.reshape(-1)
    sorted_N, order_N = torch.sort(flat_N, stable=True)
    bounds = torch.arange(num_experts, device=flat_N.device, dtype=sorted_N.dtype)
    ends_E = torch.searchsorted(sorted_N, bounds, right=True)
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    return order_N, counts_E


def unpermute_sum(rows_ND: torch.Tensor, order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y[t] = sum of the rows of token t (row i belongs to token order_N[i] // K), summed in at least fp32.

    On the CPU rows are added into their tokens in row order (deterministic, one pass); float32 training
    there takes the fused kernel, which adds each token's rows in choice order. On CUDA that add would use
    atomics, so rows are gathered back into (token, choice) order and summed per token instead.
    """
    if ops.fused_cpu_training(rows_ND):
        return ops.unpermute_sum(rows_ND, order_N, num_tokens, top_k)
    acc = torch.promote_types(rows_ND.dtype, torch.float32)  # float64 stays float64
    rows = rows_ND.to(acc)
    if rows_ND.device.type == "cpu":
        y_TD = sum_by_adding(rows, order_N, num_tokens, top_k)
    else:
        y_TD = sum_by_gathering(rows, order_N, num_tokens, top_k)
    return y_TD.to(rows_ND.dtype)


def sum_by_adding(rows_ND: torch.Tensor, order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    return rows_ND.new_zeros(num_tokens, rows_ND.shape[1]).index_add_(0, order_N // top_k, rows_ND)


def sum_by_gathering(
    rows_ND: torch.Tensor, order_N: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    by_choice = rows_ND.index_select(0, inverse_permutation(order_N))
    return by_choice.view(num_tokens, top_k, rows_ND.shape[1]).sum(1)


def _check_routing(x_TD: torch.Tensor, routing: Routing, num_experts: int) -> None:
    """Shapes always; expert ids only for CPU tensors (checking CUDA ids would synchronise the host)."""
    if x_TD.dim() != 2:
        raise DispatchError(f"dispatch: x must be [T, D], got shape {tuple(x_TD.shape)}")
    ids, weights = routing.ids_TK, routing.weights_TK
    if ids.dim() != 2 or ids.shape[0] != x_TD.shape[0] or ids.is_floating_point():
        raise DispatchError(
            f"dispatch: routing.ids_TK must be integer [T={x_TD.shape[0]}, K], "
            f"got {ids.dtype} {tuple(ids.shape)}"
        )
    if weights.shape != ids.shape:
        raise DispatchError(
            f"dispatch: routing.weights_TK {tuple(weights.shape)} must match ids_TK {tuple(ids.shape)}"
        )
    if (
        ids.device.type == "cpu"
        and ids.numel()
        and not (int(ids.min()) >= 0 and int(ids.max()) < num_experts)
    ):
        raise DispatchError(
            f"dispatch: expert ids must lie in [0, {num_experts}), got {int(ids.min())}..{int(ids.max())}"
        )


@dataclasses.dataclass(frozen=True)
class LocalHandle(DispatchHandle):
    order_N: torch.Tensor  # flat (token, choice) index of each dispatched row
    num_tokens: int
    top_k: int


class LocalDispatcher:
    """All experts in this process: rows are only sorted by expert and un-sorted after."""

    def __init__(self, num_experts: int) -> None:
        if num_experts <= 0:
            raise DispatchError(f"LocalDispatcher: num_experts must be positive, got {num_experts}")
        self.num_experts = self.num_local_experts = num_experts

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, LocalHandle]:
        _check_routing(x_TD, routing, self.num_experts)
        top_k = routing.ids_TK.shape[1]
        order_N, counts_E = sort_by_expert(routing.ids_TK, self.num_experts)
        rows_ND = ops.permute_rows(x_TD, order_N, top_k)
        row_weights_N = routing.weights_TK.reshape(-1).index_select(0, order_N)
        return rows_ND, counts_E, LocalHandle(row_weights_N, order_N, x_TD.shape[0], top_k)

    def combine(self, rows_ND: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return unpermute_sum(rows_ND, handle.order_N, handle.num_tokens, handle.top_k)

    def __repr__(self) -> str:
        return f"LocalDispatcher(num_experts={self.num_experts})"


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows with uneven splits; its backward sends the gradients the other way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, receive: list[int], send: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.receive, ctx.send, ctx.group = receive, send, group
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return back, None, None, None


@dataclasses.dataclass(frozen=True)
class AllToAllHandle(DispatchHandle):
    order_N: torch.Tensor  # this rank's rows in global expert order (= grouped by destination rank)
    num_tokens: int
    top_k: int
    send: list[int]  # rows sent to each rank
    receive: list[int]  # rows received from each rank
    regroup: torch.Tensor  # received rows (by source, then expert) -> grouped by local expert


class AllToAllDispatcher:
    """Expert parallelism over `group`: rank r of W computes experts [r E/W, (r+1) E/W) for every rank.

    Every rank must call `dispatch` and `combine` (and their backward) for the same layers in the same
    order, as collectives require. Gloo on CPU, NCCL on GPU.
    """

    def __init__(self, group: dist.ProcessGroup | None, num_experts: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts <= 0 or num_experts % self.world:
            raise DispatchError(
                f"AllToAllDispatcher: {num_experts} experts do not divide over {self.world} ranks"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world
        self.first_expert = self.rank * self.num_local_experts

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllHandle]:
        _check_routing(x_TD, routing, self.num_experts)
        top_k = routing.ids_TK.shape[1]
        local = self.num_local_experts
        order_N, counts_E = sort_by_expert(routing.ids_TK, self.num_experts)
        # Counts first: every rank learns how many rows it gets from each rank for each of its experts.
        received_WL = torch.empty_like(counts_E)
        dist.all_to_all_single(received_WL, counts_E, group=self.group)
        received_WL = received_WL.view(self.world, local).cpu()
        send = counts_E.view(self.world, local).sum(1).tolist()
        receive = received_WL.sum(1).tolist()
        rows = _AllToAll.apply(ops.permute_rows(x_TD, order_N, top_k), receive, send, self.group)
        weights = routing.weights_TK.reshape(-1).index_select(0, order_N)
        weights = _AllToAll.apply(weights, receive, send, self.group)
        # Received rows come by source rank, then expert; the experts want them by expert, then source.
        expert_of_row = torch.repeat_interleave(torch.arange(local).repeat(self.world), received_WL.flatten())
        regroup, counts_L = sort_by_expert(expert_of_row.to(rows.device).unsqueeze(1), local)
        row_weights_N = weights.index_select(0, regroup)
        handle = AllToAllHandle(row_weights_N, order_N, x_TD.shape[0], top_k, send, receive, regroup)
        return rows.index_select(0, regroup), counts_L, handle

    def combine(self, rows_ND: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        by_source = rows_ND.index_select(0, inverse_permutation(handle.regroup))
        returned = _AllToAll.apply(by_source, handle.send, handle.receive, self.group)
        return unpermute_sum(returned, handle.order_N, handle.num_tokens, handle.top_k)

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(num_experts={self.num_experts}, rank={self.rank}/{self.world}, "
            f"experts={self.first_expert}..{self.first_expert + self.num_local_experts - 1})"
        )
