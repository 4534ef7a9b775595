"""DeepSeekMoE: shared experts plus fine-grained routed experts behind a sigmoid, group-limited gate.

The layer is gate -> dispatcher -> grouped experts -> combine (+ shared experts). The gate decides,
a `TokenDispatcher` (`dsv3.model.dispatch`) moves rows and their combine weights to whoever holds the
experts and brings the rows back, and `GroupedExperts` computes the weighted SwiGLU on rows grouped by
its own experts: built from explicit sizes, so an expert-parallel rank or an expert shard holds any
subset. Shapes follow the legend in README.md.

Routing (per token):
  s = sigmoid(x W_g^T)                       affinity, float32
  b = s + e_score_correction_bias            used only to *choose* experts (aux-loss-free balancing)
  groups ranked by the sum of their top-2 b; only the best `topk_group` groups stay eligible
  ids = top-K of b among eligible experts
  weights = s[ids] (normalised over K if norm_topk_prob) * routed_scaling_factor
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3.kernels import ops
from dsv3.model.config import ModelConfig
from dsv3.model.dispatch import LocalDispatcher, Routing, TokenDispatcher
from dsv3.model.layers import SwiGLUMLP

__all__ = ["Gate", "GroupedExperts", "MoE", "Routing"]


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k and the bias used only for selection."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if num_experts % n_group or not 0 < topk_group <= n_group or not 0 < top_k <= num_experts:
            raise ValueError(
                f"Gate: {num_experts} experts, top_k={top_k}, n_group={n_group}, topk_group={topk_group} "
                "do not fit (groups must divide the experts, 0 < topk_group <= n_group, 0 < top_k <= experts)"
            )
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.scaling = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A float32 buffer, saved with the checkpoint, updated outside autograd by balance.bias.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Gate:
        return cls(
            config.hidden_size,
            config.n_routed_experts,
            config.num_experts_per_tok,
            n_group=config.n_group,
            topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """`model.to(bf16)` casts the gate weight but keeps the selection bias float32, as released."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != bias.dtype:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        scores_TE = (x_TD.float() @ self.weight.float().T).sigmoid()
        choice_TE = scores_TE.detach() + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            by_group = choice_TE.unflatten(-1, (self.n_group, -1))  # [T, G, E/G]
            group_score_TG = by_group.topk(2, dim=-1).values.sum(-1)
            kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            kept_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = by_group.masked_fill(~kept_TG[..., None], float("-inf")).flatten(1)
        ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return Routing(ids_TK, weights_TK * self.scaling, scores_TE)


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored stacked, computed on rows grouped by expert in one call.

    `gate_up_proj` [E, 2F, D] holds each expert's gate rows then up rows; `down_proj` is [E, D, F].
    `first_expert` is the layer-wide index of expert 0 here (non-zero on an expert-parallel rank or a
    shard), so checkpoint names stay global. The Hugging Face per-expert names are produced and consumed
    by `dsv3.model.hf_names`.

    `fp8` (set by `enable_fp8` or `DeepSeekV3.enable_fp8_training`) runs every GEMM of forward and
    backward in block-scaled FP8 (`ops.grouped_swiglu_fp8_training`); the parameters keep their dtype.
    """

    def __init__(self, num_experts: int, hidden_size: int, width: int, *, first_expert: int = 0) -> None:
        super().__init__()
        if num_experts < 0 or hidden_size <= 0 or width <= 0 or first_expert < 0:
            raise ValueError(
                f"GroupedExperts: need num_experts >= 0, hidden_size > 0, width > 0, first_expert >= 0; got "
                f"{num_experts}, {hidden_size}, {width}, {first_expert}"
            )
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, width))
        self.fp8 = False
        self.scale_fmt: str | None = None

    def enable_fp8(self, scale_fmt: str | None = None) -> GroupedExperts:
        """Train (and run) these experts in FP8 from now on; returns self."""
        if scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"GroupedExperts: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
        self.fp8, self.scale_fmt = True, scale_fmt
        return self

    @torch.no_grad()
    def sliced(self, first: int, count: int) -> GroupedExperts:
        """Experts [first, first + count) of these as a new module (copied weights, same precision)."""
        _, width2, hidden = self.gate_up_proj.shape
        local = GroupedExperts(count, hidden, width2 // 2, first_expert=self.first_expert + first).to(
            device=self.gate_up_proj.device, dtype=self.gate_up_proj.dtype
        )
        local.gate_up_proj.copy_(self.gate_up_proj[first : first + count])
        local.down_proj.copy_(self.down_proj[first : first + count])
        local.fp8, local.scale_fmt = self.fp8, self.scale_fmt
        return local

    def forward(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, row_weights_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SwiGLU of each expert's rows; `row_weights_N` (combine weights) scale the F-wide hidden rows."""
        if self.fp8:
            return ops.grouped_swiglu_fp8_training(
                rows_ND, counts_E, self.gate_up_proj, self.down_proj, row_weights_N, scale_fmt=self.scale_fmt
            )
        return ops.grouped_swiglu(rows_ND, counts_E, self.gate_up_proj, self.down_proj, row_weights_N)

    def extra_repr(self) -> str:
        _, width2, hidden = self.gate_up_proj.shape
        span = f"{self.first_expert}..{self.first_expert + self.num_experts - 1}"
        precision = f", fp8 (scale_fmt={self.scale_fmt})" if self.fp8 else ""
        return f"experts={span}, hidden={hidden}, width={width2 // 2}{precision}"


class MoE(nn.Module):
    """Shared experts see every token; each token also goes to its K routed experts via the dispatcher.

    `dispatcher` is plain state, not a module: `dsv3.model.parallel` swaps it (and the experts) after
    the model is built. The default keeps every expert in this process.
    """

    def __init__(
        self,
        gate: Gate,
        experts: GroupedExperts,
        shared_experts: SwiGLUMLP | None,
        dispatcher: TokenDispatcher | None = None,
    ) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts
        self.dispatcher: TokenDispatcher = dispatcher or LocalDispatcher(gate.weight.shape[0])
        # Recompute the routed experts' SwiGLU in the backward pass (dsv3.model.recompute sets it).
        self.recompute_experts = False

    @classmethod
    def from_config(cls, config: ModelConfig) -> MoE:
        shared = (
            SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        return cls(Gate.from_config(config), experts, shared)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.gate(x_TD)
        rows_ND, counts_E, handle = self.dispatcher.dispatch(x_TD, routing)
        if self.recompute_experts and torch.is_grad_enabled():
            expert_out_ND = checkpoint(
                self.experts, rows_ND, counts_E, handle.row_weights_N, use_reentrant=False
            )
        else:
            expert_out_ND = self.experts(rows_ND, counts_E, handle.row_weights_N)
        y_TD = self.dispatcher.combine(expert_out_ND, handle)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BTD), routing
