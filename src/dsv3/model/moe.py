"""DeepSeekMoE: shared experts plus fine-grained routed experts behind a sigmoid, group-limited gate.

Legend: T tokens, D hidden, E routed experts, G expert groups, K experts per token, F expert width.
Routing (per token):
  s = sigmoid(x W_g^T)                       affinity, float32
  b = s + e_score_correction_bias            used only to *choose* experts (aux-loss-free balancing)
  groups ranked by the sum of their top-2 b; only the best `topk_group` groups stay eligible
  ids = top-K of b among eligible experts
  weights = s[ids] (normalised over K if norm_topk_prob) * routed_scaling_factor
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from dsv3.kernels import ops
from dsv3.model.config import ModelConfig
from dsv3.model.layers import SwiGLUMLP


@dataclasses.dataclass
class Routing:
    """The gate's decision for T tokens."""

    ids_TK: torch.Tensor  # int64 expert index per (token, slot)
    weights_TK: torch.Tensor  # float32 combine weight per (token, slot)
    scores_TE: torch.Tensor  # float32 sigmoid affinity of every expert (for the balance loss)


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k and the bias used only for selection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # A float32 buffer, saved with the checkpoint, updated outside autograd by balance.bias.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32)
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
            choice_TGX = choice_TE.unflatten(-1, (self.n_group, -1))
            group_score_TG = choice_TGX.topk(2, dim=-1).values.sum(-1)
            kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            kept_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = choice_TGX.masked_fill(~kept_TG[..., None], float("-inf")).flatten(1)
        ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return Routing(ids_TK, weights_TK * self.scaling, scores_TE)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked so one dispatch computes all of them.

    `gate_up_proj` [E, 2F, D] holds each expert's gate rows then up rows; `down_proj` is [E, D, F].
    The Hugging Face per-expert names are produced and consumed by `dsv3.model.hf`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts, hidden, width = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width))

    def forward(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return ops.moe_experts(x_TD, routing.ids_TK, routing.weights_TK, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """Shared experts see every token; each token also goes to its K routed experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.gate(x_TD)
        y_TD = self.experts(x_TD, routing)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BTD), routing
