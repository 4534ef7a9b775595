"""Triton grouped expert computation: grouped GEMMs (bf16/fp16/fp32 and block-scaled FP8) and the SwiGLU FFN.

Rows arrive grouped by expert (the dispatcher in `dsv3.model.dispatch` permutes and un-permutes; these
kernels only compute). Shapes follow the legend in README.md: N rows, E experts, D hidden, F expert
width; a generic grouped GEMM's weight is [E, O, I] (output, input features).

`grouped_swiglu`: one grouped-GEMM launch over every expert for gate|up with SwiGLU (and each row's
combine weight) fused in the epilogue, then one for down. `grouped_swiglu_fp8`: the same on
float8_e4m3fn experts (128x128 block scales), the rows quantized per 1x128 tile before each GEMM.

Grouped GEMM schedule: expert e owns ceil(rows_e / BLOCK_M) row tiles; the grid has the upper bound
ceil(N / BLOCK_M) + E row tiles (each expert wastes at most one partial tile) times the column tiles; a
tile -> expert map made with `searchsorted` on the device tells each program its expert, and programs past
the last tile exit at once. Experts with zero rows own no tiles and cost nothing.

These kernels have no backward of their own: `dsv3.kernels.fp8_experts` builds the FP8 training path
from them and `moe_train.py`; for bf16 `dsv3.kernels.ops` uses the reference when gradients are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import fp8
from dsv3.kernels.fp8 import interpreting, kernel_cast


@triton.jit
def _grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    xs_ptr,
    ws_ptr,
    rw_ptr,
    pre_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_end_ptr,
    E,
    K,
    W_ROWS,
    OUT_COLS,
    FP8: tl.constexpr,
    SWIGLU: tl.constexpr,
    WEIGHTED: tl.constexpr,
    STORE_PRE: tl.constexpr,
    IEEE: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (row tile, column tile) of out = x @ w[e].T, or of silu(gate) * up (* rw per row) with SWIGLU.

    With SWIGLU, w[e] is [2F, K] (gate rows then up rows) and column n of the output uses rows n and F + n.
    With FP8, x has 1x128 scales xs [N, K/128] and w 128x128 scales ws [E, W_ROWS/128, K/128]; BLOCK_K = 128.
    STORE_PRE (with SWIGLU) also stores the pre-activations [gate | up] into pre [N, 2 * OUT_COLS] (what
    the SwiGLU backward needs).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    tile_first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    row_lo = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    row_hi = tl.load(offsets_ptr + e)
    offs_m = row_lo + (pid_m - tile_first) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_hi
    mask_n = offs_n < OUT_COLS
    num_kb = tl.cdiv(K, BLOCK_K)
    e64 = e.to(tl.int64)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    wg_ptrs = w_ptr + e64 * W_ROWS * K + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    wu_ptrs = wg_ptrs + OUT_COLS * K
    ws_rows = e64 * tl.cdiv(W_ROWS, 128)
    xs_ptrs = xs_ptr + offs_m * num_kb
    wsg_ptrs = ws_ptr + (ws_rows + offs_n // 128) * num_kb
    wsu_ptrs = ws_ptr + (ws_rows + (offs_n + OUT_COLS) // 128) * num_kb
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(num_kb):
        mask_k = offs_k < K - kb * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        if WIDEN:  # interpreter only: its bf16 dot is broken
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
        if FP8:
            xs = tl.load(xs_ptrs + kb, mask=mask_m, other=0.0)[:, None]
            acc_g += tl.dot(x, wg) * xs * tl.load(wsg_ptrs + kb, mask=mask_n, other=0.0)[None, :]
        elif IEEE:
            acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
        else:
            acc_g = tl.dot(x, wg, acc_g)
        if SWIGLU:
            wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
            if WIDEN:
                wu = wu.to(tl.float32)
            if FP8:
                acc_u += tl.dot(x, wu) * xs * tl.load(wsu_ptrs + kb, mask=mask_n, other=0.0)[None, :]
            elif IEEE:
                acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(x, wu, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    acc = acc_g
    if SWIGLU:
        if STORE_PRE:
            pre_ptrs = pre_ptr + offs_m[:, None].to(tl.int64) * (2 * OUT_COLS) + offs_n[None, :]
            pre_mask = mask_m[:, None] & mask_n[None, :]
            tl.store(pre_ptrs, acc_g.to(pre_ptr.dtype.element_ty), mask=pre_mask)
            tl.store(pre_ptrs + OUT_COLS, acc_u.to(pre_ptr.dtype.element_ty), mask=pre_mask)
        acc = acc_g * tl.sigmoid(acc_g) * acc_u
        if WEIGHTED:
            acc *= tl.load(rw_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * OUT_COLS + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _tile_end(offsets_E: torch.Tensor, block_m: int) -> torch.Tensor:
    """Cumulative row tiles per expert (int32): expert e owns tiles [end[e-1], end[e])."""
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    return torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0).to(torch.int32)


def _tile_map(offsets_E: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tile -> expert map, cumulative tiles per expert, grid size) without a host synchronisation."""
    num_experts = offsets_E.shape[0]
    tile_end = _tile_end(offsets_E, block_m)
    grid_m = triton.cdiv(num_rows, block_m) + num_experts
    tiles = torch.arange(grid_m, device=offsets_E.device, dtype=torch.int32)
    return torch.searchsorted(tile_end, tiles, right=True, out_int32=True), tile_end, grid_m


def _launch(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    x_s: torch.Tensor | None = None,
    w_s: torch.Tensor | None = None,
    swiglu: bool = False,
    row_weights_N: torch.Tensor | None = None,
    block_m: int | None = None,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    num_rows, k = x.shape
    w_rows = w.shape[1]
    out_cols = w_rows // 2 if swiglu else w_rows
    out = torch.empty(
        num_rows, out_cols, dtype=out_dtype if kernel_cast() else torch.float32, device=x.device
    )
    if num_rows == 0 or out_cols == 0:
        return out.to(out_dtype)
    if k == 0:
        if pre is not None:
            pre.zero_()
        return out.zero_().to(out_dtype)
    is_fp8 = x_s is not None
    if block_m is None:  # heuristic (untuned): taller row tiles once experts average that many rows
        rows_per_expert = num_rows / max(offsets_E.shape[0], 1)
        block_m = 128 if rows_per_expert >= 128 else 64 if rows_per_expert >= 64 else 32
    block_n = 64 if swiglu else 128
    block_k = 128 if is_fp8 else 64
    tile_expert, tile_end, grid_m = _tile_map(offsets_E, num_rows, block_m)
    dummy = offsets_E
    _grouped_gemm_kernel[(grid_m, triton.cdiv(out_cols, block_n))](
        x,
        w,
        out,
        x_s if is_fp8 else dummy,
        w_s if is_fp8 else dummy,
        row_weights_N if row_weights_N is not None else dummy,
        pre if pre is not None else dummy,
        offsets_E,
        tile_expert,
        tile_end,
        offsets_E.shape[0],
        k,
        w_rows,
        out_cols,
        FP8=is_fp8,
        SWIGLU=swiglu,
        WEIGHTED=row_weights_N is not None,
        STORE_PRE=pre is not None,
        IEEE=x.dtype == torch.float32,
        WIDEN=interpreting() and x.dtype in (torch.bfloat16, torch.float16),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=8 if block_m == 128 else 4,
        num_stages=3,
    )
    return out.to(out_dtype)


def grouped_gemm(
    x_ND: torch.Tensor,
    w_EOI: torch.Tensor,
    offsets_E: torch.Tensor,
    *,
    swiglu: bool = False,
    row_weights_N: torch.Tensor | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Rows sorted by expert (offsets_E: int32 cumulative counts): out[r] = x[r] @ w[e(r)].T in x's dtype.

    With `swiglu` the output is silu(gate) * up per row ([N, O/2]), times `row_weights_N` when given.
    `block_m` overrides the row-tile heuristic (16, 32, 64 or 128).
    """
    return _launch(
        x_ND, w_EOI, offsets_E, x_ND.dtype, swiglu=swiglu, row_weights_N=row_weights_N, block_m=block_m
    )


def grouped_gemm_fp8(
    x_ND: torch.Tensor,
    x_s: torch.Tensor,
    w_EOI: torch.Tensor,
    w_s: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    swiglu: bool = False,
    row_weights_N: torch.Tensor | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """`grouped_gemm` on FP8 rows (x_s [N, I/128]) and FP8 experts (w_s [E, ceil(O/128), ceil(I/128)])."""
    return _launch(
        x_ND,
        w_EOI,
        offsets_E,
        out_dtype,
        x_s=x_s,
        w_s=w_s,
        swiglu=swiglu,
        row_weights_N=row_weights_N,
        block_m=block_m,
    )


def gate_up_fp8_with_pre(
    x_ND: torch.Tensor,
    x_s: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_s: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype,
    row_weights_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 gate|up GEMM with SwiGLU (* row weight) fused: (h [N, F], pre-activations [gate | up] [N, 2F]),
    both `out_dtype`; the training forward keeps the pre-activations for the SwiGLU backward."""
    pre = torch.empty(
        x_ND.shape[0],
        w_gate_up_E2FD.shape[1],
        dtype=out_dtype if kernel_cast() else torch.float32,
        device=x_ND.device,
    )
    h = _launch(
        x_ND,
        w_gate_up_E2FD,
        offsets_E,
        out_dtype,
        x_s=x_s,
        w_s=w_s,
        swiglu=True,
        row_weights_N=row_weights_N,
        pre=pre,
    )
    return h, pre.to(out_dtype)


def grouped_swiglu(
    x_ND: torch.Tensor,
    offsets_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed experts' SwiGLU FFN on grouped rows in two launches (gate|up with SwiGLU and the row
    weight fused in the epilogue, down)."""
    h_NF = grouped_gemm(x_ND, w_gate_up_E2FD, offsets_E, swiglu=True, row_weights_N=row_weights_N)
    return grouped_gemm(h_NF, w_down_EDF, offsets_E)


def grouped_swiglu_fp8(
    x_ND: torch.Tensor,
    offsets_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    s_gate_up: torch.Tensor,
    w_down_EDF: torch.Tensor,
    s_down: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 experts: quantize rows, FP8 gate|up + SwiGLU (* row weight), quantize, FP8 down; x's dtype out."""
    x_q, x_s = fp8.act_quant(x_ND)
    h_NF = grouped_gemm_fp8(
        x_q, x_s, w_gate_up_E2FD, s_gate_up, offsets_E, x_ND.dtype, swiglu=True, row_weights_N=row_weights_N
    )
    h_q, h_s = fp8.act_quant(h_NF)
    return grouped_gemm_fp8(h_q, h_s, w_down_EDF, s_down, offsets_E, x_ND.dtype)
