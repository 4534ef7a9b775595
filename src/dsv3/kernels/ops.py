"""The one entry point through which the model calls compute kernels.

Each op validates its inputs, then dispatches: Triton kernels when the tensors live on CUDA and
Triton is importable, the pure-torch reference (`dsv3.kernels.reference`) otherwise.
"""

from __future__ import annotations

import torch

from dsv3.kernels import reference


class KernelInputError(ValueError):
    """An op was called with tensors of the wrong shape, dtype or device."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension."""
    _check(
        x.shape[-1] == weight.shape[-1], f"rms_norm: x has {x.shape[-1]} features, weight {weight.shape[-1]}"
    )
    return reference.rms_norm(x, weight, eps)


def moe_experts(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of each token's routed SwiGLU experts; see `reference.moe_experts`."""
    _check(x_TD.dim() == 2, f"moe_experts: x must be [T, D], got {tuple(x_TD.shape)}")
    _check(
        topk_ids_TK.dim() == 2 and topk_ids_TK.shape[0] == x_TD.shape[0],
        f"moe_experts: topk_ids must be [T={x_TD.shape[0]}, K], got {tuple(topk_ids_TK.shape)}",
    )
    _check(
        topk_weights_TK.shape == topk_ids_TK.shape,
        f"moe_experts: topk_weights {tuple(topk_weights_TK.shape)} != topk_ids {tuple(topk_ids_TK.shape)}",
    )
    _check(not topk_ids_TK.is_floating_point(), "moe_experts: topk_ids must be an integer tensor")
    _check(
        w_gate_up_EHD.dim() == 3
        and w_gate_up_EHD.shape[2] == x_TD.shape[1]
        and w_gate_up_EHD.shape[1] % 2 == 0,
        f"moe_experts: w_gate_up must be [E, 2F, D={x_TD.shape[1]}], got {tuple(w_gate_up_EHD.shape)}",
    )
    num_experts, width2, hidden = w_gate_up_EHD.shape
    _check(
        tuple(w_down_EDF.shape) == (num_experts, hidden, width2 // 2),
        f"moe_experts: w_down must be [E, D, F]=({num_experts}, {hidden}, {width2 // 2}), "
        f"got {tuple(w_down_EDF.shape)}",
    )
    return reference.moe_experts(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EHD, w_down_EDF)
