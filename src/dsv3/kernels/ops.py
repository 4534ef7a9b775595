"""The one entry point through which the model calls compute kernels.

Each op validates its inputs (`dsv3.kernels.validation`: `KernelInputError`, which names the argument),
then dispatches (`dsv3.kernels.backends`, whose choice functions this module re-exports):
Triton kernels when the tensors live on CUDA and Triton is importable, the pure-torch reference
(`dsv3.kernels.reference`) otherwise. The Triton modules (`fp8`, `gemm`, `moe`) are imported lazily, so
this module imports without Triton.

Backend switch: the environment variable `DSV3_KERNELS` (`auto`, the default; `triton`; `torch`) or the
context manager `force_backend(...)`, which wins over the variable. Forcing `triton` on CPU tensors runs the
kernels in Triton's interpreter and needs `TRITON_INTERPRET=1` set before Triton is imported (tests).
The Triton bf16 MoE path has no backward: when autograd needs gradients the reference runs instead
(`grouped_swiglu_fp8_training` has its own, FP8, backward).

On the CPU, float32 training (autograd needs the gradients) takes the fused C kernels of `cpu_fused`
on the "auto" backend when they are built (`DSV3_CPU_KERNELS=0` turns them off): rms_norm, silu_mul,
grouped_swiglu's activation, and MLA's head assembly (`fused_cpu_training` tells the model when).

Ops: rms_norm, silu_mul; FP8 (DeepSeek-V3 fine-grained): act_quant, weight_quant, weight_dequant,
fp8_gemm, fp8_linear; grouped experts (rows already grouped by expert: `dsv3.model.dispatch` permutes):
grouped_gemm, grouped_gemm_fp8, grouped_swiglu, grouped_swiglu_fp8; FP8 training of the experts:
grouped_swiglu_fp8_training.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from dsv3.kernels import cpu_fused, reference, rms_norm_grad, scaled_mm
from dsv3.kernels.backends import (
    BACKEND_ENV,
    BACKENDS,
    backend,
    force_backend,
    fused_cpu_training,
    needs_grad,
    triton_available,
    use_cpu_fused,
    use_triton,
)
from dsv3.kernels.validation import (
    FLOAT_DTYPES,
    FP8,
    KernelInputError,
    cdiv,
    check,
    check_block,
    check_counts,
    check_experts,
    check_offsets,
    check_row_weights,
    check_same_device,
    check_scale,
    check_tensor,
)

__all__ = [  # the ops, and the backend choice and error type callers use with them
    "BACKENDS",
    "BACKEND_ENV",
    "KernelInputError",
    "act_quant",
    "backend",
    "force_backend",
    "fp8_gemm",
    "fp8_linear",
    "fused_cpu_training",
    "grouped_gemm",
    "grouped_gemm_fp8",
    "grouped_swiglu",
    "grouped_swiglu_fp8",
    "grouped_swiglu_fp8_training",
    "mla_heads",
    "permute_rows",
    "rms_norm",
    "silu_mul",
    "triton_available",
    "unpermute_sum",
    "weight_dequant",
    "weight_quant",
]

_SCALED_MM_REFUSED: set[tuple[int, int, bool]] = set()  # (n, k, rowwise b scales) cuBLAS refused at run time


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (float32 training: a closed-form backward, `rms_norm_grad`)."""
    check(
        x.shape[-1] == weight.shape[-1], f"rms_norm: x has {x.shape[-1]} features, weight {weight.shape[-1]}"
    )
    if x.dtype == weight.dtype == torch.float32 and needs_grad(x, weight):
        if use_cpu_fused(x, weight):
            return cpu_fused.rms_norm(x, weight, eps)
        return rms_norm_grad.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def mla_heads(
    q_BTX: torch.Tensor,
    kv_BTY: torch.Tensor,
    rope_key_BTR: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    nope: int,
    vdim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-head latent attention's SDPA inputs, each [B, H, T, Q] contiguous, in one fused CPU pass
    (`cpu_fused.MLAHeads`): q = [q_nope | rot(q_rope)] per head from `q_BTX` [B, T, H*Q]; k = [k_nope |
    rot(rope_key)], the one rope key shared by every head, k_nope from `kv_BTY` [B, T, H*(U+A)]; v from
    `kv_BTY`, zero-padded to width Q. cos/sin [T, R/2] as `dsv3.model.rope`. Float32 CPU tensors with the
    fused kernels on only; elsewhere the model composes them from torch ops itself."""
    op = "mla_heads"
    check(
        q_BTX.dim() == 3 and q_BTX.shape[-1] % heads == 0,
        f"{op}: q must be [B, T, H*Q], got {tuple(q_BTX.shape)}",
    )
    width = q_BTX.shape[-1] // heads
    rope = width - nope
    check(nope >= 0 and rope > 0 and rope % 2 == 0, f"{op}: nope={nope} leaves {rope} rope dims (even, > 0)")
    check(0 < vdim <= width, f"{op}: vdim={vdim} must be in (0, Q={width}]")
    tokens = tuple(q_BTX.shape[:2])
    check(
        tuple(kv_BTY.shape) == (*tokens, heads * (nope + vdim)),
        f"{op}: kv must be [B, T, H*(U+A)] = {(*tokens, heads * (nope + vdim))}, got {tuple(kv_BTY.shape)}",
    )
    check(
        tuple(rope_key_BTR.shape) == (*tokens, rope),
        f"{op}: rope_key must be [B, T, R] = {(*tokens, rope)}, got {tuple(rope_key_BTR.shape)}",
    )
    check(
        tuple(cos.shape) == tuple(sin.shape) == (tokens[1], rope // 2),
        f"{op}: cos/sin must be [T, R/2] = {(tokens[1], rope // 2)}, "
        f"got {tuple(cos.shape)} and {tuple(sin.shape)}",
    )
    check(
        use_cpu_fused(q_BTX, kv_BTY, rope_key_BTR, cos, sin),
        f"{op}: float32 CPU tensors and the fused CPU kernels on (the model checks fused_cpu_training)",
    )
    return cpu_fused.MLAHeads.apply(q_BTX, kv_BTY, rope_key_BTR, cos, sin, heads, nope, vdim)


def permute_rows(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """The MoE's dispatched rows in expert order, x_TD[order_N // top_k] [N, D]: fused for float32 CPU
    training (its backward a gather-sum, no scatter), else torch's index_select."""
    check(x_TD.dim() == 2, f"permute_rows: x must be [T, D], got {tuple(x_TD.shape)}")
    check(
        order_N.dim() == 1 and order_N.dtype == torch.int64 and order_N.shape[0] == x_TD.shape[0] * top_k,
        f"permute_rows: order must be int64 [T*K = {x_TD.shape[0] * top_k}], got {order_N.dtype} "
        f"{tuple(order_N.shape)}",
    )
    if fused_cpu_training(x_TD):
        return cpu_fused.permute_rows(x_TD, order_N, top_k)
    return x_TD.index_select(0, order_N // top_k)


def unpermute_sum(rows_ND: torch.Tensor, order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y[t] = the sum of token t's K rows (row i is token order_N[i] // K's), in one fused CPU pass that
    adds in choice order (`cpu_fused.unpermute_sum`): float32 CPU rows with the fused kernels on only;
    elsewhere `dsv3.model.dispatch.unpermute_sum` adds with torch ops."""
    check(
        rows_ND.dim() == 2 and rows_ND.shape[0] == num_tokens * top_k == order_N.shape[0],
        f"unpermute_sum: rows {tuple(rows_ND.shape)} and order {tuple(order_N.shape)} must both hold "
        f"T*K = {num_tokens * top_k} rows",
    )
    check(order_N.dtype == torch.int64, f"unpermute_sum: order must be int64, got {order_N.dtype}")
    check(use_cpu_fused(rows_ND), "unpermute_sum: float32 CPU rows with the fused CPU kernels on only")
    return cpu_fused.unpermute_sum(rows_ND, order_N, num_tokens, top_k)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the dense SwiGLU's activation); fused on the CPU when training in float32."""
    check(gate.shape == up.shape, f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if gate.dtype == up.dtype == torch.float32 and needs_grad(gate, up) and use_cpu_fused(gate, up):
        return cpu_fused.silu_mul(gate, up)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------
# FP8 fine-grained quantization (semantics: reference.act_quant & co.)
# ---------------------------------------------------------------------------------------------------


def act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] per 1x128 tile of the last dim -> (float8_e4m3fn [..., K], fp32 [..., K/128]).

    A K that is not a multiple of 128 ends with a partial tile (scale over the elements present).
    """
    check_tensor("act_quant", "x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    check_block("act_quant", block_size, scale_fmt)
    if use_triton("act_quant", x):
        from dsv3.kernels import fp8

        return fp8.act_quant(x, block_size, scale_fmt)
    return reference.act_quant(x, block_size, scale_fmt)


def weight_quant(
    w: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [..., N, K] per 128x128 block -> (float8_e4m3fn, fp32 [..., ceil(N/128), ceil(K/128)])."""
    check_tensor("weight_quant", "w", w, dtypes=FLOAT_DTYPES, min_dim=2)
    check_block("weight_quant", block_size, scale_fmt)
    if use_triton("weight_quant", w):
        from dsv3.kernels import fp8

        return fp8.weight_quant(w, block_size, scale_fmt)
    return reference.weight_quant(w, block_size, scale_fmt)


def weight_dequant(
    w: torch.Tensor, s: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """w [..., N, K] float8_e4m3fn times its block scales s [..., ceil(N/128), ceil(K/128)] -> `dtype`."""
    check_tensor("weight_dequant", "w", w, dtypes=(FP8,), min_dim=2)
    check_block("weight_dequant", block_size)
    n, k = w.shape[-2:]
    check_scale("weight_dequant", "s", s, (*w.shape[:-2], cdiv(n, block_size), cdiv(k, block_size)))
    check(dtype in FLOAT_DTYPES, f"weight_dequant: dtype must be a float type, got {dtype}")
    check_same_device("weight_dequant", w=w, s=s)
    if use_triton("weight_dequant", w, s):
        from dsv3.kernels import fp8

        return fp8.weight_dequant(w, s, block_size, dtype)
    return reference.weight_dequant(w, s, block_size, dtype)


def _check_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> bool:
    """Validate `fp8_gemm` operands; returns whether b's scales are 1x128 tiles (else 128x128 blocks)."""
    op = "fp8_gemm"
    check_tensor(op, "a", a, dtypes=(FP8,), dim=2)
    check_tensor(op, "b", b, dtypes=(FP8,), dim=2)
    m, k = a.shape
    n = b.shape[0]
    check(b.shape[1] == k, f"{op}: a is [M, K={k}] but b is {tuple(b.shape)}; b must be [N, K]")
    check_scale(op, "a_s", a_s, (m, cdiv(k, 128)))
    check_tensor(op, "b_s", b_s, dtypes=(torch.float32,), dim=2)
    rowwise = tuple(b_s.shape) == (n, cdiv(k, 128))
    check(
        rowwise or tuple(b_s.shape) == (cdiv(n, 128), cdiv(k, 128)),
        f"{op}: b_s must be [ceil(N/128), ceil(K/128)] = {(cdiv(n, 128), cdiv(k, 128))} (128x128 blocks) "
        f"or [N, ceil(K/128)] = {(n, cdiv(k, 128))} (1x128 tiles), got {tuple(b_s.shape)}",
    )
    check_same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)
    return rowwise


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a @ b.T for float8_e4m3fn a [M, K] (a_s [M, ceil(K/128)]) and b [N, K] (b_s: 128x128 blocks
    [ceil(N/128), ceil(K/128)] or 1x128 tiles [N, ceil(K/128)]), FP32 accumulation, -> `out_dtype`.

    On CUDA (backend "auto") the per-shape policy `scaled_mm.fp8_gemm_backend` picks torch's cuBLAS
    blockwise scaled_mm or the Triton kernel; a shape cuBLAS refuses at run time falls back to Triton.
    """
    rowwise = _check_fp8_gemm(a, a_s, b, b_s)
    check(out_dtype in FLOAT_DTYPES, f"fp8_gemm: out_dtype must be a float type, got {out_dtype}")
    (m, k), n = a.shape, b.shape[0]
    if not use_triton("fp8_gemm", a, b):
        return reference.fp8_gemm(a, a_s, b, b_s, out_dtype)
    from dsv3.kernels import gemm

    if backend() == "triton" or not a.is_cuda:
        return gemm.fp8_gemm(a, a_s, b, b_s, out_dtype)
    choice = scaled_mm.fp8_gemm_backend(
        m,
        n,
        k,
        capability=scaled_mm.device_capability(a.device.index or 0),
        has_scaled_mm=scaled_mm.scaled_mm_api() is not None,
        has_triton=True,
        known_unsupported=(n, k, rowwise) in _SCALED_MM_REFUSED,
    )
    if choice == "scaled_mm":
        try:
            return scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s, out_dtype)
        except RuntimeError as err:
            _SCALED_MM_REFUSED.add((n, k, rowwise))
            warnings.warn(
                f"fp8_gemm: cuBLAS scaled_mm refused N={n} K={k}, using Triton: {err}", stacklevel=2
            )
            choice = "triton"
    if choice == "torch":
        return reference.fp8_gemm(a, a_s, b, b_s, out_dtype)
    return gemm.fp8_gemm(a, a_s, b, b_s, out_dtype)


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """x @ W.T for float x [M, K] and an FP8 weight w [N, K] with 128x128 block scales w_s: x quantized per
    1x128 tile (`act_quant` semantics), FP32 accumulation, -> `out_dtype` (x's dtype by default).

    On CUDA decode shapes (M <= 128) quantize inside the Triton GEMM: one launch, no quantized copy of x,
    no host synchronisation; larger M quantize first and take `fp8_gemm`'s per-shape choice (cuBLAS).
    """
    op = "fp8_linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "w", w, dtypes=(FP8,), dim=2)
    (m, k), n = x.shape, w.shape[0]
    check(w.shape[1] == k, f"{op}: x is [M, K={k}] but w is {tuple(w.shape)}; w must be [N, K]")
    check_scale(op, "w_s", w_s, (cdiv(n, 128), cdiv(k, 128)))
    check_block(op, 128, scale_fmt)
    out_dtype = out_dtype or x.dtype
    check(out_dtype in FLOAT_DTYPES, f"{op}: out_dtype must be a float type, got {out_dtype}")
    check_same_device(op, x=x, w=w, w_s=w_s)
    if use_triton(op, x, w) and (backend() == "triton" or m <= scaled_mm.DECODE_MAX_M):
        from dsv3.kernels import gemm

        return gemm.fp8_gemm(x, None, w, w_s, out_dtype, scale_fmt=scale_fmt)
    x_q, x_s = act_quant(x, scale_fmt=scale_fmt)
    return fp8_gemm(x_q, x_s, w, w_s, out_dtype)


# ---------------------------------------------------------------------------------------------------
# MoE building blocks (semantics: reference.grouped_gemm & co.)
# ---------------------------------------------------------------------------------------------------


def grouped_gemm(x_ND: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[r] = x[r] @ w[e].T for the rows offsets[e-1] <= r < offsets[e] of expert e (one launch)."""
    op = "grouped_gemm"
    check_tensor(op, "x_ND", x_ND, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "w_EOI", w_EOI, dtypes=(x_ND.dtype,), dim=3)
    check(
        w_EOI.shape[2] == x_ND.shape[1],
        f"{op}: w_EOI must be [E, O, I={x_ND.shape[1]}], got {tuple(w_EOI.shape)}",
    )
    check_offsets(op, offsets_E, w_EOI.shape[0], x_ND.shape[0])
    check_same_device(op, x_ND=x_ND, w_EOI=w_EOI, offsets_E=offsets_E)
    if use_triton(op, x_ND, w_EOI):
        from dsv3.kernels import moe

        return moe.grouped_gemm(x_ND, w_EOI, offsets_E)
    return reference.grouped_gemm(x_ND, w_EOI, offsets_E)


def grouped_gemm_fp8(
    x_ND: torch.Tensor,
    x_s: torch.Tensor,
    w_EOI: torch.Tensor,
    w_s: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`grouped_gemm` on float8_e4m3fn rows (x_s [N, ceil(K/128)]) and experts (w_s [E, ceil(O/128),
    ceil(K/128)]), scales applied per 128-wide K step, FP32 accumulation."""
    op = "grouped_gemm_fp8"
    check_tensor(op, "x_ND", x_ND, dtypes=(FP8,), dim=2)
    check_tensor(op, "w_EOI", w_EOI, dtypes=(FP8,), dim=3)
    (n, k), (e, o) = x_ND.shape, w_EOI.shape[:2]
    check(w_EOI.shape[2] == k, f"{op}: w_EOI must be [E, O, I={k}], got {tuple(w_EOI.shape)}")
    check_scale(op, "x_s", x_s, (n, cdiv(k, 128)))
    check_scale(op, "w_s", w_s, (e, cdiv(o, 128), cdiv(k, 128)))
    check(out_dtype in FLOAT_DTYPES, f"{op}: out_dtype must be a float type, got {out_dtype}")
    check_offsets(op, offsets_E, e, n)
    check_same_device(op, x_ND=x_ND, x_s=x_s, w_EOI=w_EOI, w_s=w_s, offsets_E=offsets_E)
    if use_triton(op, x_ND, w_EOI):
        from dsv3.kernels import moe

        return moe.grouped_gemm_fp8(x_ND, x_s, w_EOI, w_s, offsets_E, out_dtype)
    return reference.grouped_gemm_fp8(x_ND, x_s, w_EOI, w_s, offsets_E, out_dtype)


def grouped_swiglu(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed experts' SwiGLU FFN on rows grouped by expert (counts_E[e] consecutive rows each):
    out[r] = down_e(w[r] * silu(gate_e(x[r])) * up_e(x[r])), w the rows' combine weights (1 when None);
    see `reference.grouped_swiglu`.

    Triton (fused SwiGLU, no backward) on CUDA when no gradient is needed, else the torch reference.
    """
    op = "grouped_swiglu"
    check_tensor(op, "x_ND", x_ND, dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    check_tensor(op, "w_gate_up_E2FD", w_gate_up_E2FD, dtypes=FLOAT_DTYPES, dim=3, contiguous=False)
    check_tensor(op, "w_down_EDF", w_down_EDF, dtypes=FLOAT_DTYPES, dim=3, contiguous=False)
    check_experts(op, x_ND, w_gate_up_E2FD, w_down_EDF)
    check_counts(op, counts_E, w_gate_up_E2FD.shape[0], x_ND.shape[0])
    check_row_weights(op, row_weights_N, x_ND.shape[0])
    check_same_device(op, x_ND=x_ND, w_gate_up_E2FD=w_gate_up_E2FD, w_down_EDF=w_down_EDF)
    tensors = (x_ND, w_gate_up_E2FD, w_down_EDF, *(() if row_weights_N is None else (row_weights_N,)))
    same_dtype = x_ND.dtype == w_gate_up_E2FD.dtype == w_down_EDF.dtype
    if same_dtype and not needs_grad(*tensors) and use_triton(op, *tensors):
        from dsv3.kernels import moe

        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        weights = row_weights_N.float().contiguous() if row_weights_N is not None else None
        return moe.grouped_swiglu(
            x_ND.contiguous(), offsets_E, w_gate_up_E2FD.contiguous(), w_down_EDF.contiguous(), weights
        )
    if needs_grad(*tensors) and use_cpu_fused(*tensors):
        return reference.grouped_swiglu(
            x_ND, counts_E, w_gate_up_E2FD, w_down_EDF, row_weights_N, activation=cpu_fused.weighted_swiglu
        )
    return reference.grouped_swiglu(x_ND, counts_E, w_gate_up_E2FD, w_down_EDF, row_weights_N)


def grouped_swiglu_fp8(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    s_gate_up: torch.Tensor,
    w_down_EDF: torch.Tensor,
    s_down: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """`grouped_swiglu` with float8_e4m3fn experts (128x128 block scales) and 1x128-quantized rows."""
    op = "grouped_swiglu_fp8"
    check_tensor(op, "x_ND", x_ND, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "w_gate_up_E2FD", w_gate_up_E2FD, dtypes=(FP8,), dim=3)
    check_tensor(op, "w_down_EDF", w_down_EDF, dtypes=(FP8,), dim=3)
    check_experts(op, x_ND, w_gate_up_E2FD, w_down_EDF)
    e, h, d = w_gate_up_E2FD.shape
    check_scale(op, "s_gate_up", s_gate_up, (e, cdiv(h, 128), cdiv(d, 128)))
    check_scale(op, "s_down", s_down, (e, cdiv(d, 128), cdiv(h // 2, 128)))
    check_counts(op, counts_E, e, x_ND.shape[0])
    check_row_weights(op, row_weights_N, x_ND.shape[0])
    args = (x_ND, w_gate_up_E2FD, s_gate_up, w_down_EDF, s_down)
    names = ("x_ND", "w_gate_up_E2FD", "s_gate_up", "w_down_EDF", "s_down")
    check_same_device(op, **dict(zip(names, args, strict=True)))
    if use_triton(op, x_ND, w_gate_up_E2FD, w_down_EDF):
        from dsv3.kernels import moe

        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        weights = row_weights_N.float().contiguous() if row_weights_N is not None else None
        return moe.grouped_swiglu_fp8(x_ND, offsets_E, *args[1:], weights)
    return reference.grouped_swiglu_fp8(x_ND, counts_E, *args[1:], row_weights_N)


def grouped_swiglu_fp8_training(
    x: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
    *,
    rows_N: torch.Tensor | None = None,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """`grouped_swiglu` with every GEMM of forward and backward in FP8 (`dsv3.kernels.fp8_experts`):
    differentiable in x, both (high-precision master) weights and the row weights.

    With `rows_N` (int64 [N]) the experts' rows are x[rows_N] (x [T, D]): the permutation is fused with
    the rows' quantization, and x's gradient sums each source row's copies.
    """
    op = "grouped_swiglu_fp8_training"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    check_tensor(op, "w_gate_up_E2FD", w_gate_up_E2FD, dtypes=FLOAT_DTYPES, dim=3, contiguous=False)
    check_tensor(op, "w_down_EDF", w_down_EDF, dtypes=FLOAT_DTYPES, dim=3, contiguous=False)
    check_experts(op, x, w_gate_up_E2FD, w_down_EDF)
    num_rows = x.shape[0]
    if rows_N is not None:
        check_tensor(op, "rows_N", rows_N, dim=1)
        check(not rows_N.is_floating_point(), f"{op}: rows_N must be an integer tensor")
        num_rows = rows_N.shape[0]
    check_counts(op, counts_E, w_gate_up_E2FD.shape[0], num_rows)
    check_row_weights(op, row_weights_N, num_rows)
    check_block(op, 128, scale_fmt)
    check_same_device(op, x=x, w_gate_up_E2FD=w_gate_up_E2FD, w_down_EDF=w_down_EDF, counts_E=counts_E)
    from dsv3.kernels import fp8_experts

    return fp8_experts.grouped_swiglu_fp8_training(
        x,
        counts_E,
        w_gate_up_E2FD,
        w_down_EDF,
        row_weights_N,
        rows_N=rows_N,
        scale_fmt=scale_fmt,
        use_triton=use_triton(op, x, w_gate_up_E2FD, w_down_EDF),
    )
