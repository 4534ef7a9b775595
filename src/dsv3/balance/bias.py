"""Load balancing for the routed experts, as in the DeepSeek-V3 report.

- Auxiliary-loss-free balancing: after each step, every MoE layer's per-expert selection bias moves
  by a fixed `gamma` towards balance: b_i += gamma * sign(mean_load - load_i). The bias only affects
  which experts are chosen, so the model's output weights stay unbiased.
- The complementary sequence-wise balance loss (weight alpha, tiny in the report) discourages extreme
  imbalance inside a single sequence.

The forward pass only reports what each gate did (`ModelOutput.expert_loads`, `.routings`); the update
and the loss are computed here, outside it, so a trainer can sum loads over micro-batches and ranks
(`all_reduce_loads`) before one update. Shapes follow the legend in README.md (L MoE layers, E routed
experts, B sequences, T tokens per sequence, K experts per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dsv3.model.dispatch import Routing


def bias_update(load_LE: torch.Tensor, gamma: float) -> torch.Tensor:
    """The step to add to each layer's bias: gamma * sign(mean load of the layer - expert load)."""
    load = load_LE.float()
    return gamma * torch.sign(load.mean(dim=-1, keepdim=True) - load)


@torch.no_grad()
def apply_bias_update(biases: list[torch.Tensor], load_LE: torch.Tensor, gamma: float) -> None:
    """Update each layer's `e_score_correction_bias` in place from that layer's load [E]."""
    if len(biases) != load_LE.shape[0]:
        raise ValueError(f"{len(biases)} bias tensors but loads for {load_LE.shape[0]} layers")
    step_LE = bias_update(load_LE, gamma)
    for bias_E, step_E in zip(biases, step_LE, strict=True):
        bias_E.add_(step_E.to(bias_E.device, bias_E.dtype))


def expert_load(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64)."""
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def sequence_balance_loss(scores_BTE: torch.Tensor, ids_BTK: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence, averaged over sequences.

    f_i = E / (K T) * #tokens of the sequence routed to expert i (no gradient);
    P_i = mean over the sequence's tokens of s_i / sum_j s_j (normalised affinities).
    """
    _, tokens, experts = scores_BTE.shape
    top_k = ids_BTK.shape[-1]
    chosen_BTE = torch.zeros_like(scores_BTE).scatter_(-1, ids_BTK, 1.0)
    f_BE = chosen_BTE.sum(1) * (experts / (top_k * tokens))
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return alpha * (f_BE.detach() * p_BE).sum(-1).mean()


def sequence_balance_loss_of(routings: Sequence[Routing], batch: int, alpha: float) -> torch.Tensor:
    """The sequence-wise balance loss summed over gates, from a forward's `routings` of `batch` sequences."""
    if not routings:
        raise ValueError("sequence_balance_loss_of: no routings (the model has no MoE layer that ran)")
    total = torch.zeros((), device=routings[0].scores_TE.device)
    for r in routings:
        total = total + sequence_balance_loss(
            r.scores_TE.view(batch, -1, r.scores_TE.shape[-1]),
            r.ids_TK.view(batch, -1, r.ids_TK.shape[-1]),
            alpha,
        )
    return total


def all_reduce_loads(load_LE: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Loads summed over the ranks of `group` (in place), so every rank makes the same bias update."""
    dist.all_reduce(load_LE, op=dist.ReduceOp.SUM, group=group)
    return load_LE
