"""Dense FP8 GEMM on CUDA: which backend runs a shape, and the call into torch's cuBLAS blockwise scaled_mm.

Pure torch (no Triton import), so the per-shape policy `fp8_gemm_backend` is unit-testable on the CPU.
Measured on this project's H100 (ANCHORS.md): torch's blockwise `_scaled_mm` (1x128 x 128x128 scales)
~1130 TFLOP/s at 4096^3 against ~620 for a DeepSeek-style Triton kernel; decode shapes (M = 64..128) run at
100-200 TFLOP/s for all of them. Hence: cuBLAS for large shapes that it supports, our Triton kernel for
decode (M <= 128) and for shapes cuBLAS refuses (N or K not a multiple of 128, M not a multiple of 16).
"""

from __future__ import annotations

import functools
import weakref
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["scaled_mm", "triton", "torch"]
DECODE_MAX_M = 128


@functools.cache
def scaled_mm_api() -> Literal["v2", "v1"] | None:
    """`"v2"`: torch.nn.functional.scaled_mm with explicit blockwise recipes; `"v1"`: torch._scaled_mm."""
    scaling = getattr(F, "ScalingType", None)
    if hasattr(F, "scaled_mm") and scaling is not None and hasattr(scaling, "BlockWise128x128"):
        return "v2"
    return "v1" if hasattr(torch, "_scaled_mm") else None


def fp8_gemm_backend(
    m: int,
    n: int,
    k: int,
    *,
    capability: tuple[int, int] | None,
    has_scaled_mm: bool,
    has_triton: bool,
    known_unsupported: bool = False,
) -> Backend:
    """Backend for a CUDA block-scaled GEMM of a [m, k] by b [n, k] (pure logic).

    `capability` is the device's compute capability (None: not CUDA); `known_unsupported` is set once
    scaled_mm has refused this (n, k) at run time.
    """
    cublas_ok = (
        has_scaled_mm
        and capability is not None
        and capability[0] in (9, 10)  # cuBLAS blockwise FP8: Hopper and Blackwell datacenter parts
        and not known_unsupported
        and n % 128 == 0
        and k % 128 == 0
        and m % 16 == 0
        and m > 0
    )
    if (
        has_triton
        and capability is not None
        and capability >= (8, 9)
        and (m <= DECODE_MAX_M or not cublas_ok)
    ):
        return "triton"  # FP8 tensor cores from Ada (8.9) on; decode shapes and the shapes cuBLAS refuses
    if cublas_ok:
        return "scaled_mm"
    return "torch"


@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device `index`, asked once (the query costs microseconds per GEMM)."""
    return torch.cuda.get_device_capability(index)


_BLOCK_SCALE_LAYOUTS: weakref.WeakKeyDictionary[torch.Tensor, tuple[int, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def block_scale_layout(b_s: torch.Tensor) -> torch.Tensor:
    """128x128 weight scales [N/128, K/128] in cuBLAS's layout ([K/128 padded to 4, N/128], column-major),
    cached per scale tensor and its version: a weight quantized once (inference) converts once."""
    cached = _BLOCK_SCALE_LAYOUTS.get(b_s)
    if cached is not None and cached[0] == b_s._version:
        return cached[1]
    num_kb = b_s.shape[1]
    padded_kb = -(-num_kb // 4) * 4  # cuBLAS wants the K-block count of 128x128 scales padded to 4
    scale_b = b_s.new_zeros(b_s.shape[0], padded_kb, dtype=torch.float32)
    scale_b[:, :num_kb] = b_s
    layout = scale_b.t()  # [K/128 (padded), N/128], strides (1, padded)
    _BLOCK_SCALE_LAYOUTS[b_s] = (b_s._version, layout)
    return layout


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major strides (what cuBLAS wants for the scale tensors)."""
    return t.t().contiguous().t()


def blockwise_scaled_mm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a @ b.T through torch's blockwise scaled_mm: a_s 1x128 tiles; b_s 128x128 blocks or 1x128 tiles.

    Needs M % 16 == 0, N % 128 == 0, K % 128 == 0 (see `fp8_gemm_backend`); raises RuntimeError otherwise.
    """
    rowwise_b = b_s.shape[0] == b.shape[0]
    scale_a = _col_major(a_s.float())  # [M, K/128], strides (1, M)
    api = scaled_mm_api()
    if api == "v1":
        # torch._scaled_mm takes b's scales K-block-major: [K/128, N] or [K/128, N/128], column-major.
        return torch._scaled_mm(a, b.t(), scale_a, b_s.float().contiguous().t(), out_dtype=out_dtype)
    if api is None:
        raise RuntimeError("this torch has no scaled_mm")
    recipe = F.ScalingType
    # 1x128 scales of b: [N, K/128] with strides (1, N)
    scale_b = _col_major(b_s.float()) if rowwise_b else block_scale_layout(b_s)
    return F.scaled_mm(
        a,
        b.t(),
        scale_a,
        recipe.BlockWise1x128,
        scale_b,
        recipe.BlockWise1x128 if rowwise_b else recipe.BlockWise128x128,
        output_dtype=out_dtype,
    )
