"""DeepSeek's FP8 release layout: a float8_e4m3fn `weight` and a float32 `weight_scale_inv` per block.

DeepSeek publishes V3 this way: every quantized projection holds its weight in FP8 with one scale
per 128x128 block (`quantization_config.weight_block_size`, partial blocks at the edges), and the real
weight is their product. Loading multiplies them back; dsv3 saves the plain layout.
"""

from __future__ import annotations

import torch

from dsv3.kernels import reference
from dsv3.model.config import ConfigError
from dsv3.model.hf_names import CheckpointFormatError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_block_size(raw_config: dict) -> int:
    """The square block edge of an FP8 checkpoint's weight scales (DeepSeek's release: 128)."""
    quant = raw_config.get("quantization_config")
    if quant is None:
        return 128
    if not isinstance(quant, dict):
        raise ConfigError(f"quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method", "fp8")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    block = quant.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or block[0] != block[1]
        or not isinstance(block[0], int)
        or block[0] <= 0
    ):
        raise ConfigError(
            f"quantization_config.weight_block_size must be a square [b, b] of positive ints, got {block!r}"
        )
    return block[0]


def dequantize_weight(name: str, weight: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """The float32 weight that `weight` (float8) and its per-block `scale` encode; `name` for errors."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise CheckpointFormatError(
            f"{name}: FP8 weights must be 2-D float8_e4m3fn, got {weight.dtype} {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    blocks = (-(-rows // block_size), -(-cols // block_size))
    if tuple(scale.shape) != blocks or not scale.is_floating_point():
        raise CheckpointFormatError(
            f"{name}{SCALE_SUFFIX}: expected float scales of shape {blocks} "
            f"({block_size}x{block_size} blocks of a {rows}x{cols} weight), "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    # The torch reference takes any block edge, on the CPU tensors safetensors hands back.
    return reference.weight_dequant(weight, scale.float(), block_size, torch.float32)
