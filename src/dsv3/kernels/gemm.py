"""Triton block-scaled FP8 GEMM: c = a @ b.T with DeepSeek-V3 fine-grained scales.

a [M, K] float8_e4m3fn with 1x128 tile scales a_s [M, ceil(K/128)]; b [N, K] float8_e4m3fn with either
128x128 block scales b_s [ceil(N/128), ceil(K/128)] (weights) or 1x128 tile scales b_s [N, ceil(K/128)]
(the weight-gradient GEMM, whose right operand is an activation). Each 128-wide K step is one tensor-core
dot in FP32 whose partial result is multiplied by its two scales and added to an FP32 accumulator: the
"promotion to CUDA cores" of the DeepSeek-V3 report, at the finest interval (every 128 elements of K).
M, N and K need not be multiples of the tiles: loads and stores are masked.

Semantics: `dsv3.kernels.reference.fp8_gemm`. Call through `dsv3.kernels.ops.fp8_gemm` (validation, and the
choice between this kernel and torch's cuBLAS blockwise `scaled_mm`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv3.kernels.fp8 import _scale_from_amax, interpreting, kernel_cast


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one `fp8_gemm` launch."""

    block_m: int
    block_n: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def gemm_config(m: int, n: int, num_sms: int = 132) -> GemmConfig:
    """Heuristic tiles, not autotuned: small BLOCK_M for decode, narrower N tiles until the grid fills
    the GPU. BLOCK_K is fixed at 128, the scale granularity.
    """
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 128
    while block_n > 32 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < num_sms:
        block_n //= 2
    big = block_m == 128 and block_n == 128
    return GemmConfig(block_m, block_n, num_warps=8 if big else 4, num_stages=4 if big else 3)


@triton.jit
def _round_to_e4m3(y):
    """float32 values in [-448, 448] rounded to the nearest float8_e4m3fn value (ties to even), in fp32.

    Used under the interpreter, whose own fp32 -> e4m3 cast is wrong (fp8.py): normals keep 3 mantissa
    bits (integer rounding of the fp32 bits), subnormals (|y| < 2**-6) round to multiples of 2**-9.
    """
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (y + 24576.0) - 24576.0  # 1.5 * 2**14: fp32 spacing 2**-9 around it
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    B_SCALE_ROWS: tl.constexpr,
    QUANT_A: tl.constexpr,
    EMULATE: tl.constexpr,
    POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Walk GROUP_M row tiles down a column of tiles before moving right, so B tiles stay in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_kb = tl.cdiv(K, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    as_ptrs = as_ptr + offs_m * num_kb
    bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * num_kb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(num_kb):
        mask_k = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if QUANT_A:  # a is bf16/fp32: quantize this 1x128 tile of each row here (act_quant's semantics)
            a32 = a.to(tl.float32)
            a_s = _scale_from_amax(tl.max(tl.abs(a32), axis=1), POW2)
            a = tl.minimum(tl.maximum(tl.math.div_rn(a32, a_s[:, None]), -448.0), 448.0)
            if EMULATE:
                a = _round_to_e4m3(a)
                b = b.to(tl.float32)
            else:
                a = a.to(b.dtype)
        else:
            a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of `device` (asked once: the query costs microseconds per GEMM)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor | None,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """a @ b.T (see module doc); inputs contiguous, already validated by `ops.fp8_gemm`.

    With a in bf16/fp16/fp32 (a_s ignored) each 1x128 tile of a is quantized inside the GEMM, as
    `act_quant(a, scale_fmt=scale_fmt)` would: one launch for decode shapes instead of two.
    """
    m, k = a.shape
    n = b.shape[0]
    b_scale_rows = 1 if b_s.shape[0] == n else 128
    if config is None:
        config = gemm_config(m, n, _num_sms(a.device))
    c = torch.empty(m, n, dtype=out_dtype if kernel_cast() else torch.float32, device=a.device)
    if m and n:
        if k == 0:
            return c.zero_().to(out_dtype)
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        _fp8_gemm_kernel[grid](
            a,
            b,
            c,
            a_s if a_s is not None else b_s,
            b_s,
            m,
            n,
            k,
            B_SCALE_ROWS=b_scale_rows,
            QUANT_A=a.dtype != b.dtype,
            EMULATE=interpreting(),
            POW2=scale_fmt == "ue8m0",
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=128,
            GROUP_M=config.group_m,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return c.to(out_dtype)
