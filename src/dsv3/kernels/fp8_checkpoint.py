"""Read DeepSeek's released FP8 checkpoint layout.

In the release, each quantized linear stores `<name>.weight` as float8_e4m3fn [N, K] next to
`<name>.weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)]: the multiplier that dequantizes each 128x128
block (w = weight * weight_scale_inv, block-wise; the last blocks may be partial). Everything else (norms,
embeddings, gates, biases) is stored unquantized. `dequantize_state_dict` turns such a state dict into plain
weights for the bf16/fp32 model; `split_fp8_state_dict` keeps the (weight, scale) pairs for an FP8 path
(`FP8Linear.from_fp8`, `ops.fp8_gemm`, `ops.moe_experts_fp8` after stacking experts).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dsv3.kernels import ops
from dsv3.kernels.ops import KernelInputError

SCALE_SUFFIX = "_scale_inv"
BLOCK = 128


def _scale_key(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


def split_fp8_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(unquantized tensors, {weight key: (float8_e4m3fn weight, fp32 scale_inv)}), checked for consistency.

    Raises `KernelInputError` naming the key when an FP8 weight has no scale, a scale has no FP8 weight, or a
    scale's shape does not match its weight's 128x128 blocks.
    """
    plain: dict[str, torch.Tensor] = {}
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith(SCALE_SUFFIX):
            weight_key = key.removesuffix(SCALE_SUFFIX)
            weight = state_dict.get(weight_key)
            if weight is None or weight.dtype != torch.float8_e4m3fn:
                raise KernelInputError(f"{key}: scale without a float8_e4m3fn tensor {weight_key!r}")
            continue
        if tensor.dtype != torch.float8_e4m3fn:
            plain[key] = tensor
            continue
        scale = state_dict.get(_scale_key(key))
        if scale is None:
            raise KernelInputError(f"{key}: float8_e4m3fn tensor without {_scale_key(key)!r}")
        if tensor.dim() != 2:
            raise KernelInputError(f"{key}: an FP8 weight must be 2-D [N, K], got {tuple(tensor.shape)}")
        n, k = tensor.shape
        blocks = (-(-n // BLOCK), -(-k // BLOCK))
        if tuple(scale.shape) != blocks:
            raise KernelInputError(
                f"{_scale_key(key)}: expected shape {blocks} for a weight of shape {(n, k)}, "
                f"got {tuple(scale.shape)}"
            )
        pairs[key] = (tensor, scale.float())
    return plain, pairs


def dequantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The state dict with every FP8 weight dequantized to `dtype` and the `*_scale_inv` entries dropped.

    Key order is kept; unquantized tensors pass through unchanged (same objects).
    """
    _, pairs = split_fp8_state_dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if key in pairs:
            weight, scale = pairs[key]
            out[key] = ops.weight_dequant(weight.contiguous(), scale.contiguous(), dtype=dtype)
        else:
            out[key] = tensor
    return out
