"""Triton kernels for FP8 training of the grouped experts: the quantizations the backward needs, and the
grouped weight-gradient GEMM over ragged groups of rows.

Semantics: `dsv3.kernels.reference` (`act_quant`, `grouped_col_quant`, `swiglu_backward`,
`grouped_wgrad_fp8`). Rows arrive grouped by expert (offsets_E: int32 cumulative counts); every kernel
walks the same tile map as `moe.py` with 128-row tiles, so tile t of the launch is tile t of the grouped
column layout and no host synchronisation is needed (the grid is the upper bound ceil(N/128) + E).

`grouped_quant`: one read of a [N, K] tensor (optionally gathered through `rows`, fusing the token
permutation) writes both its 1x128 quantization (forward and dgrad GEMMs) and its per-expert 128x1 one
(weight-gradient GEMMs), from the same 128x128 tile in registers.
`swiglu_backward_quant`: the SwiGLU backward (dh, the saved gate|up pre-activations, the row weights ->
d[gate|up] and the row weights' gradient) fused with the same two quantizations of its output.
`grouped_wgrad_fp8`: out[e] = a_e.T @ b_e, contracting over expert e's rows 128 at a time (one scale per
feature and tile, FP32 accumulation after every tile), float32 [E, O, I].

Under the interpreter the kernels store float32 and torch casts (see `fp8.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels.fp8 import _scale_from_amax, kernel_cast
from dsv3.kernels.moe import _tile_end, _tile_map
from dsv3.kernels.reference import FP8_DTYPE, grouped_tile_capacity

TILE = 128


@triton.jit
def _grouped_dual_quant_kernel(
    x_ptr,
    rows_ptr,
    gu_ptr,
    rw_ptr,
    dw_ptr,
    q_ptr,
    s_ptr,
    qt_ptr,
    st_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_end_ptr,
    E,
    K,
    F,
    stride_x,
    CAPACITY,
    GATHER: tl.constexpr,
    SWIGLU_BWD: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ROWWISE: tl.constexpr,
    COLWISE: tl.constexpr,
    POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: one expert's 128-row tile x one 128-column tile of the values v [N, K].

    v is x[rows] (GATHER), x, or with SWIGLU_BWD the gradient of h = w * silu(g) * u with respect to
    [g | u] (K = 2F; x is dh [N, F], gu the saved [g | u]); WEIGHTED also stores this tile's part of
    sum_f dh * silu(g) * u (the row weight's gradient) into dw [N, ceil(K/128)].
    """
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    if e >= E:
        return
    tile_first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    row_lo = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    row_hi = tl.load(offsets_ptr + e)
    local = tl.arange(0, BLOCK)
    offs_m = row_lo + (pid_t - tile_first) * BLOCK + local
    offs_k = pid_k * BLOCK + local
    mask_m = offs_m < row_hi
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    rows64 = offs_m.to(tl.int64)
    num_kb = tl.cdiv(K, BLOCK)
    if SWIGLU_BWD:
        is_gate = offs_k < F
        f = tl.where(is_gate, offs_k, offs_k - F)
        dh = tl.load(x_ptr + rows64[:, None] * F + f[None, :], mask=mask, other=0.0).to(tl.float32)
        gu_ptrs = gu_ptr + rows64[:, None] * (2 * F) + f[None, :]
        g = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptrs + F, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        da = dh
        if WEIGHTED:
            w = tl.load(rw_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            da = dh * w[:, None]
            part = tl.sum(tl.where(is_gate[None, :], dh * g * sig * u, 0.0), axis=1)
            tl.store(dw_ptr + rows64 * num_kb + pid_k, part, mask=mask_m)
        v = tl.where(is_gate[None, :], da * u * sig * (1 + g * (1 - sig)), da * g * sig)
    else:
        src = rows64
        if GATHER:
            src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        v = tl.load(x_ptr + src[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROWWISE:
        s = _scale_from_amax(tl.max(tl.abs(v), axis=1), POW2)
        y = tl.minimum(tl.maximum(tl.math.div_rn(v, s[:, None]), -448.0), 448.0)
        tl.store(q_ptr + rows64[:, None] * K + offs_k[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows64 * num_kb + pid_k, s, mask=mask_m)
    if COLWISE:
        st = _scale_from_amax(tl.max(tl.abs(v), axis=0), POW2)
        yt = tl.minimum(tl.maximum(tl.math.div_rn(v, st[None, :]), -448.0), 448.0)
        position = pid_t.to(tl.int64) * BLOCK + local  # padding rows of a partial tile store zeros
        qt_ptrs = qt_ptr + offs_k[None, :].to(tl.int64) * (CAPACITY * BLOCK) + position[:, None]
        tl.store(qt_ptrs, yt.to(qt_ptr.dtype.element_ty), mask=mask_k[None, :])
        tl.store(st_ptr + offs_k.to(tl.int64) * CAPACITY + pid_t, st, mask=mask_k)


def _dual_quant(
    x: torch.Tensor,
    offsets_E: torch.Tensor,
    num_rows: int,
    k: int,
    *,
    rows: torch.Tensor | None = None,
    gate_up: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    rowwise: bool = True,
    colwise: bool = True,
    scale_fmt: str | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor | None, ...]:
    device = x.device
    kernel_dtype = out_dtype if kernel_cast() else torch.float32
    num_kb = triton.cdiv(k, TILE)
    capacity = grouped_tile_capacity(num_rows, offsets_E.shape[0])
    q = torch.empty(num_rows, k, dtype=kernel_dtype, device=device) if rowwise else None
    s = torch.empty(num_rows, num_kb, dtype=torch.float32, device=device) if rowwise else None
    qt = torch.empty(k, capacity * TILE, dtype=kernel_dtype, device=device) if colwise else None
    st = torch.empty(k, capacity, dtype=torch.float32, device=device) if colwise else None
    swiglu = gate_up is not None
    dw = (
        torch.empty(num_rows, num_kb, dtype=torch.float32, device=device)
        if swiglu and row_weights is not None
        else None
    )
    if num_rows and k:
        tile_expert, tile_end, grid_m = _tile_map(offsets_E, num_rows, TILE)
        dummy = offsets_E
        _grouped_dual_quant_kernel[(grid_m, num_kb)](
            x,
            rows if rows is not None else dummy,
            gate_up if swiglu else dummy,
            row_weights if row_weights is not None else dummy,
            dw if dw is not None else dummy,
            q if q is not None else dummy,
            s if s is not None else dummy,
            qt if qt is not None else dummy,
            st if st is not None else dummy,
            offsets_E,
            tile_expert,
            tile_end,
            offsets_E.shape[0],
            k,
            k // 2 if swiglu else 0,
            x.stride(0) if x.dim() == 2 else k,
            capacity,
            GATHER=rows is not None,
            SWIGLU_BWD=swiglu,
            WEIGHTED=dw is not None,
            ROWWISE=rowwise,
            COLWISE=colwise,
            POW2=scale_fmt == "ue8m0",
            BLOCK=TILE,
            num_warps=8,
        )
    elif colwise:
        qt.zero_()
        st.fill_(1.0)
    if q is not None:
        q = q.to(out_dtype)
    if qt is not None:
        qt = qt.to(out_dtype)
    grad_w = dw.sum(1) if dw is not None else None
    return q, s, qt, st, grad_w


def grouped_quant(
    x_NK: torch.Tensor,
    offsets_E: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    rowwise: bool = True,
    colwise: bool = True,
    scale_fmt: str | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(q [N, K], s [N, K/128]) 1x128 and (qt [K, capacity*128], st [K, capacity]) grouped 128x1 of
    v = x (or x[rows], rows int [N]: the permutation fused); either pair is None when not asked for."""
    num_rows = x_NK.shape[0] if rows is None else rows.shape[0]
    q, s, qt, st, _ = _dual_quant(
        x_NK,
        offsets_E,
        num_rows,
        x_NK.shape[1],
        rows=rows,
        rowwise=rowwise,
        colwise=colwise,
        scale_fmt=scale_fmt,
        out_dtype=out_dtype,
    )
    return q, s, qt, st


def swiglu_backward_quant(
    grad_NF: torch.Tensor,
    gate_up_N2F: torch.Tensor,
    row_weights_N: torch.Tensor | None,
    offsets_E: torch.Tensor,
    *,
    colwise: bool = True,
    scale_fmt: str | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The SwiGLU backward fused with both quantizations of d[gate|up]: (q, s, qt, st, grad_row_weights)."""
    num_rows, width = grad_NF.shape
    q, s, qt, st, grad_w = _dual_quant(
        grad_NF,
        offsets_E,
        num_rows,
        2 * width,
        gate_up=gate_up_N2F,
        row_weights=row_weights_N,
        colwise=colwise,
        scale_fmt=scale_fmt,
        out_dtype=out_dtype,
    )
    if grad_w is None and row_weights_N is not None:
        grad_w = torch.zeros(num_rows, dtype=torch.float32, device=grad_NF.device)
    return q, s, qt, st, grad_w


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    as_ptr,
    bs_ptr,
    out_ptr,
    tile_end_ptr,
    O,
    I,
    CAPACITY,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: a BLOCK_M x BLOCK_N tile of out[e] = sum over e's tiles t of a[:, t].T-contracted
    products, each tile's dot scaled by a's and b's per-feature scales of that tile."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    t_first = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
    t_last = tl.load(tile_end_ptr + e)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < O
    mask_n = offs_n < I
    row_stride = CAPACITY * BLOCK_K
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * row_stride + offs_k[None, :]
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * row_stride + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_first, t_last):
        a = tl.load(a_rows + t * BLOCK_K, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_cols + t * BLOCK_K, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_m * CAPACITY + t, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptr + offs_n * CAPACITY + t, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    out_ptrs = out_ptr + (e.to(tl.int64) * O + offs_m[:, None]) * I + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def grouped_wgrad_fp8(
    a_qt: torch.Tensor,
    a_st: torch.Tensor,
    b_qt: torch.Tensor,
    b_st: torch.Tensor,
    offsets_E: torch.Tensor,
) -> torch.Tensor:
    """out[e] = a_e.T @ b_e over expert e's rows, from `grouped_quant` column layouts of a [N, O] and
    b [N, I] -> float32 [E, O, I]; experts without rows get zeros."""
    o, i = a_qt.shape[0], b_qt.shape[0]
    capacity = a_st.shape[1]
    num_experts = offsets_E.shape[0]
    out = torch.empty(num_experts, o, i, dtype=torch.float32, device=a_qt.device)
    if not out.numel():
        return out
    tile_end = _tile_end(offsets_E, TILE)
    block_m = block_n = 128
    grid = (triton.cdiv(o, block_m) * triton.cdiv(i, block_n), num_experts)
    _grouped_wgrad_kernel[grid](
        a_qt,
        b_qt,
        a_st,
        b_st,
        out,
        tile_end,
        o,
        i,
        capacity,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=TILE,
        num_warps=8,
        num_stages=3,
    )
    return out
