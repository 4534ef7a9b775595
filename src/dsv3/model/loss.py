"""Training objective: next-token cross-entropy + lambda * MTP loss + the sequence-wise balance loss."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dsv3.balance.bias import sequence_balance_loss_of
from dsv3.model.transformer import ModelOutput


@dataclasses.dataclass
class LossParts:
    total: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor | None
    balance: torch.Tensor | None


def _cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_BT.reshape(-1))


def language_model_loss(
    output: ModelOutput, input_ids: torch.Tensor, mtp_weight: float = 0.3, balance_alpha: float = 0.0
) -> LossParts:
    """Main loss on row i -> token i+1; MTP depth k on row i -> token i+k+1, averaged over depths; plus
    the sequence-wise balance loss of every gate that ran when `balance_alpha` > 0."""
    main = _cross_entropy(output.logits[:, :-1], input_ids[:, 1:])
    depth_losses = [
        _cross_entropy(logits[:, : input_ids.shape[1] - depth - 1], input_ids[:, depth + 1 :])
        for depth, logits in enumerate(output.mtp_logits, start=1)
        if input_ids.shape[1] > depth + 1
    ]
    mtp = torch.stack(depth_losses).mean() if depth_losses else None
    total = main
    if mtp is not None:
        total = total + mtp_weight * mtp
    balance = None
    if balance_alpha > 0 and output.routings:
        balance = sequence_balance_loss_of(output.routings, output.batch, balance_alpha)
        total = total + balance
    return LossParts(total, main, mtp, balance)
