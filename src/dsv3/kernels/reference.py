"""Pure-torch reference implementations of every op in `dsv3.kernels.ops`.

These run anywhere (CPU, CUDA, meta) and define the semantics the Triton kernels are tested against.

Shapes follow the legend in README.md (N rows grouped by expert, E experts, D hidden, F expert width;
in the generic grouped GEMMs O and I are a weight's output and input features).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the checkpoint's reference does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def inverse_permutation(order_N: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i (O(N), unlike a second sort): the MoE dispatch's way back."""
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device, dtype=order_N.dtype)
    return inverse_N


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a [..., 2F] tensor holding [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _scaled(hidden_NF: torch.Tensor, row_weights_N: torch.Tensor | None) -> torch.Tensor:
    return hidden_NF if row_weights_N is None else hidden_NF * row_weights_N.to(hidden_NF.dtype)[:, None]


def weighted_swiglu(gate_up_N2F: torch.Tensor, row_weights_N: torch.Tensor | None) -> torch.Tensor:
    """w[r] * silu(gate) * up for rows of [gate | up] (w = 1 without `row_weights_N`)."""
    return _scaled(swiglu(gate_up_N2F), row_weights_N)


def _swiglu_looped(
    x_ND: torch.Tensor,
    counts: list[int],
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """One matmul pair per expert on contiguous slices (any dtype and alignment)."""
    outputs = []
    weights = row_weights_N.split(counts) if row_weights_N is not None else [None] * len(counts)
    # unbind once: indexing w[e] per expert would make autograd zero-fill a full-size gradient per expert.
    for rows, row_weights, w_gate_up, w_down in zip(
        x_ND.split(counts), weights, w_gate_up_E2FD.unbind(0), w_down_EDF.unbind(0), strict=True
    ):
        if rows.shape[0]:
            outputs.append(_scaled(swiglu(rows @ w_gate_up.T), row_weights) @ w_down.T)
    if outputs:
        return torch.cat(outputs)
    # No rows at all (an expert-parallel rank nobody sent tokens to): still an output that autograd
    # connects to the rows and the weights. The weights then get zero gradients rather than none, and the
    # backward reaches the dispatcher's exchange, which every rank of the group must join.
    connected = x_ND.sum() + w_gate_up_E2FD.sum() + w_down_EDF.sum()
    if row_weights_N is not None:
        connected = connected + row_weights_N.sum()
    return x_ND.new_zeros(0, w_down_EDF.shape[1]) + 0 * connected


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _can_group(x_ND: torch.Tensor, width: int) -> bool:
    """torch's CPU grouped GEMM covers fp32/bf16/fp16 rows aligned to 16 bytes (and, for its backward,
    at least one row); the rest take the loop."""
    if not hasattr(torch, "_grouped_mm") or x_ND.device.type != "cpu" or x_ND.dtype not in _GROUPED_MM_DTYPES:
        return False
    return x_ND.shape[0] > 0 and all(size * x_ND.element_size() % 16 == 0 for size in (x_ND.shape[1], width))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch's grouped GEMM backward
    refuses the stride-0 gradients that e.g. `out.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def grouped_swiglu(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = weighted_swiglu,
) -> torch.Tensor:
    """Routed-expert SwiGLU FFN on rows grouped by expert: out[r] = down_e(w[r] * silu(gate_e(x[r])) *
    up_e(x[r])) for the counts_E[e] consecutive rows of expert e (w = 1 without `row_weights_N`).
    `activation(gate_up, w)` computes the weighted SwiGLU between the two grouped GEMMs (a fused kernel
    may stand in for this module's `weighted_swiglu`).

    `w_gate_up_E2FD` holds each expert's gate rows then its up rows; differentiable. Both GEMMs run as
    single grouped GEMMs where torch has them (empty experts cost nothing), else one pair per expert.
    """
    if _can_group(x_ND, w_down_EDF.shape[2]):
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        gate_up = torch._grouped_mm(x_ND, w_gate_up_E2FD.transpose(-2, -1), offs=offsets_E)
        hidden_NF = activation(gate_up, row_weights_N)  # its backward hands back a contiguous gradient
        out_ND = torch._grouped_mm(hidden_NF, w_down_EDF.transpose(-2, -1), offs=offsets_E)
        return _ContiguousGrad.apply(out_ND)
    return _swiglu_looped(x_ND, counts_E.tolist(), w_gate_up_E2FD, w_down_EDF, row_weights_N)


# ---------------------------------------------------------------------------------------------------
# FP8 fine-grained quantization (DeepSeek-V3 report, section 3.3) and FP8 / grouped expert GEMMs.
#
# Activations: one scale per 1x128 tile along the last (inner) dimension; weights: one per 128x128
# block. Format float8_e4m3fn, scale = max(amax, 1e-4) / 448 (the floor keeps all-zero tiles finite, as in
# DeepSeek's inference code); with scale_fmt="ue8m0" the scale is rounded UP to a power of two, computed
# exactly (2**ceil(log2(s)) from the fp32 exponent bits, not from an approximate log2). A dimension that
# is not a multiple of 128 ends with a partial tile/block: its scale covers only the elements that exist.
# Values are divided by the scale in fp32 and clamped to +-448 before the cast; dequantization multiplies.
# ---------------------------------------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(s)) for positive normal fp32 `s`, exactly (UE8M0 scale rounding)."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(s), exponent - (mantissa == 0.5).to(exponent.dtype))


def fp8_scale(amax: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """Dequantization scale for a tile/block with absolute maximum `amax` (fp32)."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    # Divide by a tensor, not a Python number: on CUDA torch turns `x / scalar` into `x * (1 / scalar)`,
    # which is off by an ulp from the correctly rounded quotient the kernels compute.
    s = amax / torch.full_like(amax, FP8_MAX)
    return pow2_ceil(s) if scale_fmt == "ue8m0" else s


def _padded_blocks(x: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    """Zero-pad `dim` up to a multiple of `block_size` (zeros never raise an amax)."""
    pad = -x.shape[dim] % block_size
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, out_dtype: torch.dtype = FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per 1 x `block_size` tile of the last dim: y [..., K] `out_dtype`, s [..., ceil(K/128)] fp32.

    `out_dtype=torch.float32` returns the scaled, clamped values before the cast to FP8.
    """
    k = x.shape[-1]
    tiles = _padded_blocks(x.float(), -1, block_size).unflatten(-1, (-1, block_size))
    s = fp8_scale(tiles.abs().amax(-1), scale_fmt)
    y = (tiles / s[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k]
    return y.to(out_dtype), s


def act_dequant(
    y: torch.Tensor, s: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `act_quant`: y * s with each scale repeated over its tile."""
    return (y.float() * s.repeat_interleave(block_size, -1)[..., : y.shape[-1]]).to(dtype)


def weight_quant(
    w: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None, out_dtype: torch.dtype = FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., N, K] per `block_size` x `block_size` block: s [..., ceil(N/128), ceil(K/128)] fp32."""
    n, k = w.shape[-2:]
    blocks = _padded_blocks(_padded_blocks(w.float(), -1, block_size), -2, block_size)
    blocks = blocks.unflatten(-1, (-1, block_size)).unflatten(-3, (-1, block_size))  # [.., NB, bs, KB, bs]
    s = fp8_scale(blocks.abs().amax(dim=(-3, -1)), scale_fmt)
    y = (blocks / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return y.flatten(-4, -3).flatten(-2)[..., :n, :k].to(out_dtype), s


def weight_dequant(
    w: torch.Tensor, s: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `weight_quant` (also reads the released checkpoints' `weight` + `weight_scale_inv`)."""
    n, k = w.shape[-2:]
    full = s.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n, :k]
    return (w.float() * full).to(dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a @ b.T for FP8 a [M, K] (1x128 scales a_s) and b [N, K]: b_s is [ceil(N/128), ceil(K/128)] (128x128
    blocks) or [N, ceil(K/128)] (1x128 tiles, as in the weight-gradient GEMM). Exact fp32 math, then cast."""
    b32 = act_dequant(b, b_s) if b_s.shape[0] == b.shape[0] else weight_dequant(b, b_s, dtype=torch.float32)
    return (act_dequant(a, a_s) @ b32.T).to(out_dtype)


def _expert_slices(offsets_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets_E.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def grouped_gemm(x_ND: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert: out[r] = x[r] @ w[e].T for offsets[e-1] <= r < offsets[e]; fp32 math."""
    out = x_ND.new_zeros(x_ND.shape[0], w_EOI.shape[1])
    for e, (lo, hi) in enumerate(_expert_slices(offsets_E)):
        out[lo:hi] = (x_ND[lo:hi].float() @ w_EOI[e].float().T).to(out.dtype)
    return out


def grouped_gemm_fp8(
    x_ND: torch.Tensor,
    x_s: torch.Tensor,
    w_EOI: torch.Tensor,
    w_s: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`grouped_gemm` on FP8 rows and FP8 experts (128x128 scales w_s [E, O/128, K/128])."""
    x32 = act_dequant(x_ND, x_s)
    out = torch.zeros(x_ND.shape[0], w_EOI.shape[1], dtype=out_dtype, device=x_ND.device)
    for e, (lo, hi) in enumerate(_expert_slices(offsets_E)):
        out[lo:hi] = (x32[lo:hi] @ weight_dequant(w_EOI[e], w_s[e], dtype=torch.float32).T).to(out_dtype)
    return out


def grouped_swiglu_fp8(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    s_gate_up: torch.Tensor,
    w_down_EDF: torch.Tensor,
    s_down: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """`grouped_swiglu` with FP8 experts (128x128 block scales) and FP8 rows (1x128 tiles).

    Rows are quantized before each GEMM (the SwiGLU output, times the row weight, rounded to x's dtype
    first); the gate|up GEMM returns fp32, the down GEMM x's dtype.
    """
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_q, x_s = act_quant(x_ND)
    gate_up = grouped_gemm_fp8(x_q, x_s, w_gate_up_E2FD, s_gate_up, offsets_E, out_dtype=torch.float32)
    h_q, h_s = act_quant(_scaled(swiglu(gate_up), row_weights_N).to(x_ND.dtype))
    return grouped_gemm_fp8(h_q, h_s, w_down_EDF, s_down, offsets_E, out_dtype=x_ND.dtype)


# ---------------------------------------------------------------------------------------------------
# FP8 training of the grouped experts (DeepSeek-V3 report, section 3.3, figure 7, applied per expert).
#
# The weight-gradient GEMMs of expert e contract over its rows, so their operands are quantized along the
# token dimension: 128x1 tiles that restart at every expert's first row ("grouped column quantization").
# Those operands are stored transposed, [features, tiles * 128]: tile t (numbered across experts in
# order, expert e owning ceil(rows_e / 128) of them) holds the rows lo_e + 128 j .. of its expert, zero
# padded, so a 128-wide K step of the weight-gradient GEMM is exactly one tile with one scale per feature.
# ---------------------------------------------------------------------------------------------------


def grouped_tile_end(offsets_E: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Cumulative count of `block`-row tiles per expert (int64): expert e owns tiles [end[e-1], end[e])."""
    counts = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long))
    return torch.cumsum(torch.div(counts + block - 1, block, rounding_mode="floor"), 0)


def grouped_tile_capacity(num_rows: int, num_experts: int, block: int = 128) -> int:
    """Tiles allocated for the grouped column quantization: an upper bound known without a host sync."""
    return -(-num_rows // block) + num_experts


def grouped_col_quant(
    x_NK: torch.Tensor,
    offsets_E: torch.Tensor,
    scale_fmt: str | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """128x1 quantization per expert: (qt [K, capacity * 128] `out_dtype`, st [K, capacity] fp32).

    Tiles past the last expert's stay zero (the kernels leave them unwritten; nothing reads them).
    """
    num_rows, k = x_NK.shape
    capacity = grouped_tile_capacity(num_rows, offsets_E.shape[0])
    qt = torch.zeros(k, capacity * 128, dtype=torch.float32, device=x_NK.device)
    st = torch.zeros(k, capacity, dtype=torch.float32, device=x_NK.device)
    tile_end = grouped_tile_end(offsets_E).tolist()
    for (lo, hi), t0, t1 in zip(_expert_slices(offsets_E), [0, *tile_end[:-1]], tile_end, strict=True):
        if hi > lo:
            q, s = act_quant(x_NK[lo:hi].t(), scale_fmt=scale_fmt, out_dtype=torch.float32)
            qt[:, t0 * 128 : t0 * 128 + hi - lo] = q
            st[:, t0:t1] = s
    return qt.to(out_dtype), st


def grouped_wgrad_fp8(
    a_qt: torch.Tensor,
    a_st: torch.Tensor,
    b_qt: torch.Tensor,
    b_st: torch.Tensor,
    offsets_E: torch.Tensor,
) -> torch.Tensor:
    """Per expert e: a_e.T @ b_e over its rows, from grouped column quantizations of a [N, O] and b [N, I]
    (`grouped_col_quant` layout) -> float32 [E, O, I] (zero for experts without rows)."""
    a32, b32 = act_dequant(a_qt, a_st), act_dequant(b_qt, b_st)
    out = a32.new_zeros(offsets_E.shape[0], a_qt.shape[0], b_qt.shape[0])
    tile_end = grouped_tile_end(offsets_E).tolist()
    for e, (t0, t1) in enumerate(zip([0, *tile_end[:-1]], tile_end, strict=True)):
        out[e] = a32[:, t0 * 128 : t1 * 128] @ b32[:, t0 * 128 : t1 * 128].T
    return out


def swiglu_backward(
    grad_NF: torch.Tensor, gate_up_N2F: torch.Tensor, row_weights_N: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of h = w * silu(gate) * up: (d[gate | up] [N, 2F], dw [N] or None), in float32."""
    grad = grad_NF.float()
    gate, up = gate_up_N2F.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    activated = gate * sig * up
    weights = row_weights_N.float()[:, None] if row_weights_N is not None else 1.0
    grad_act = grad * weights
    grad_gate = grad_act * up * sig * (1 + gate * (1 - sig))
    grad_w = (grad * activated).sum(-1) if row_weights_N is not None else None
    return torch.cat([grad_gate, grad_act * gate * sig], dim=-1), grad_w
