"""Triton kernels for DeepSeek-V3 fine-grained FP8 quantization (1x128 activation tiles, 128x128 blocks).

Semantics are defined by `dsv3.kernels.reference` (`act_quant`, `weight_quant`, `weight_dequant`):
float8_e4m3fn, scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two (`scale_fmt="ue8m0"`),
partial last tiles/blocks when a dimension is not a multiple of 128. Call these through `dsv3.kernels.ops`,
which validates the inputs; the wrappers here assume contiguous tensors of the right dtype.

`act_quant` can also gather its rows (`rows=`), which fuses the MoE token permutation with the quantization.

Under the Triton interpreter (`TRITON_INTERPRET=1`, CPU) triton 3.9 gets narrow floats wrong inside kernels:
float32 -> float8_e4m3fn casts land one binade low when rounding carries (and err in the subnormal range),
float32 -> bfloat16 casts truncate, and a bfloat16 `tl.dot` returns garbage. There, by default, kernels
store float32 and torch performs the final cast (`kernel_cast()`, also used by `gemm.py` and `moe.py`),
and bf16 dot operands are widened to fp32. On a GPU the kernels store the narrow types directly and
multiply bf16 on the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from dsv3.kernels.reference import FP8_DTYPE  # the constants live with the reference semantics


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(knobs.runtime.interpret)


def kernel_cast(requested: bool | None = None) -> bool:
    """Whether kernels cast their outputs themselves: `requested`, else not under the interpreter."""
    return not interpreting() if requested is None else requested


@triton.jit
def _scale_from_amax(amax, POW2: tl.constexpr):
    """Dequantization scale max(amax, 1e-4) / 448, rounded up to a power of two (exactly) when POW2."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        exponent = bits & 0x7F800000
        exponent = tl.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent)
        s = exponent.to(tl.float32, bitcast=True)
    return s


@triton.jit
def _act_quant_kernel(
    x_ptr,
    rows_ptr,
    y_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    GATHER: tl.constexpr,
    POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M rows x one BLOCK_K tile. y[m, k] = clamp(x[src(m), k] / s[m, kb]); s per tile."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    src = offs_m.to(tl.int64)
    if GATHER:
        src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    x = tl.load(x_ptr + src[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale_from_amax(tl.max(tl.abs(x), axis=1), POW2)
    y = tl.math.div_rn(x, s[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask
    )
    tl.store(s_ptr + offs_m * tl.cdiv(K, BLOCK_K) + pid_k, s, mask=mask_m)


def act_quant(
    x: torch.Tensor,
    block_size: int = 128,
    scale_fmt: str | None = None,
    *,
    rows: torch.Tensor | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
    cast_in_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-1x128-tile quantization of x [..., K] -> (y [..., K], s [..., ceil(K/128)] fp32).

    With `rows` (int, [M]) x must be 2-D and the result is the quantization of x[rows] (gather fused).
    `out_dtype=torch.float32` returns the pre-cast values (debugging, interpreter tests); `cast_in_kernel`
    overrides `kernel_cast()` (tests of the in-kernel cast).
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0] if rows is None else rows.shape[0]
    lead = x.shape[:-1] if rows is None else (m,)
    kernel_dtype = out_dtype if kernel_cast(cast_in_kernel) else torch.float32
    y = torch.empty(m, k, dtype=kernel_dtype, device=x.device)
    s = torch.empty(m, triton.cdiv(k, block_size), dtype=torch.float32, device=x.device)
    block_m = 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_size))
    if m and k:
        _act_quant_kernel[grid](
            x2,
            rows if rows is not None else s,
            y,
            s,
            m,
            k,
            x2.stride(0),
            GATHER=rows is not None,
            POW2=scale_fmt == "ue8m0",
            BLOCK_M=block_m,
            BLOCK_K=block_size,
        )
    return y.to(out_dtype).view(*lead, k), s.view(*lead, s.shape[1])


@triton.jit
def _weight_block(N, K, BLOCK: tl.constexpr):
    """This program's BLOCK x BLOCK block of w [batch, N, K]: element offsets, bounds mask, scale index."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    offs = batch * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    s_index = (batch * tl.cdiv(N, BLOCK) + pid_n) * tl.cdiv(K, BLOCK) + pid_k
    return offs, mask, s_index


@triton.jit
def _weight_quant_kernel(
    w_ptr, y_ptr, yt_ptr, s_ptr, N, K, TRANSPOSED: tl.constexpr, POW2: tl.constexpr, BLOCK: tl.constexpr
):
    """One program per BLOCK x BLOCK block of one matrix (program_id(2) walks a leading batch dim);
    TRANSPOSED also stores the block into yt [batch, K, N] (the dgrad GEMM's operand)."""
    offs, mask, s_index = _weight_block(N, K, BLOCK)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _scale_from_amax(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    y = tl.minimum(tl.maximum(tl.math.div_rn(w, s), -448.0), 448.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + s_index, s)
    if TRANSPOSED:
        offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        batch = tl.program_id(2).to(tl.int64)
        offs_t = batch * N * K + offs_k[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(yt_ptr + offs_t, y.to(yt_ptr.dtype.element_ty), mask=mask)


def weight_quant(
    w: torch.Tensor,
    block_size: int = 128,
    scale_fmt: str | None = None,
    *,
    out_dtype: torch.dtype = FP8_DTYPE,
    transposed: bool = False,
):
    """Per-128x128-block quantization of w [..., N, K] -> (y, s [..., ceil(N/128), ceil(K/128)] fp32).

    `transposed=True` returns (y, s, yt): yt [..., K, N] is y transposed (its scales are s transposed),
    written by the same kernel from the same block, for the backward's dgrad GEMM.
    """
    n, k = w.shape[-2:]
    w3 = w.reshape(-1, n, k)
    kernel_dtype = out_dtype if kernel_cast() else torch.float32
    y = torch.empty(w3.shape, dtype=kernel_dtype, device=w.device)
    yt = torch.empty(w3.shape[0], k, n, dtype=kernel_dtype, device=w.device) if transposed else y
    nb, kb = triton.cdiv(n, block_size), triton.cdiv(k, block_size)
    s = torch.empty(w3.shape[0], nb, kb, dtype=torch.float32, device=w.device)
    if w3.numel():
        _weight_quant_kernel[(nb, kb, w3.shape[0])](
            w3,
            y,
            yt,
            s,
            n,
            k,
            TRANSPOSED=transposed,
            POW2=scale_fmt == "ue8m0",
            BLOCK=block_size,
            num_warps=8,
        )
    result = y.to(out_dtype).view(w.shape), s.view(*w.shape[:-2], nb, kb)
    if transposed:
        return (*result, yt.to(out_dtype).view(*w.shape[:-2], k, n))
    return result


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, BLOCK: tl.constexpr):
    offs, mask, s_index = _weight_block(N, K, BLOCK)
    s = tl.load(s_ptr + s_index)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (w * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(
    w: torch.Tensor, s: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """w [..., N, K] (FP8) times its 128x128 block scales s [..., ceil(N/128), ceil(K/128)] -> `dtype`."""
    n, k = w.shape[-2:]
    w3 = w.reshape(-1, n, k)
    y = torch.empty(w3.shape, dtype=dtype if kernel_cast() else torch.float32, device=w.device)
    if w3.numel():
        grid = (triton.cdiv(n, block_size), triton.cdiv(k, block_size), w3.shape[0])
        _weight_dequant_kernel[grid](w3, s.contiguous(), y, n, k, BLOCK=block_size, num_warps=8)
    return y.to(dtype).view(w.shape)
