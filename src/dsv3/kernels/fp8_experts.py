"""FP8 training of the routed experts: a differentiable grouped SwiGLU whose six GEMMs all run in FP8.

DeepSeek-V3 report, section 3.3 (figure 7), applied per expert to rows grouped by expert:

- forward   gate|up = x @ Wgu_e.T, h = w * silu(gate) * up, out = h @ Wd_e.T: x and h per 1x128 tile along
            their features, the weights per 128x128 block (SwiGLU and the row weight fused in the first
            GEMM's epilogue, which also keeps the pre-activations for the backward);
- dgrad     dh = dout @ Wd_e, dx = d[gate|up] @ Wgu_e: the output gradients per 1x128 tile, the weights'
            transposes per 128x128 block (written by the same quantization kernel as the weights);
- wgrad     dWd_e = dout_e.T @ h_e, dWgu_e = d[gate|up]_e.T @ x_e: both operands re-quantized per 128x1
            tile along the tokens, tiles restarting at every expert (`reference.grouped_col_quant`).

Master weights keep their dtype; their gradients come out of FP32 accumulators (promoted every 128
along K) and are cast to it. The activations the wgrad GEMMs need are cached in their FP8 128x1 form,
quantized in the forward from the same read as the 1x128 form. Any rows per expert, zero included; an
empty input still gives the weights zero gradients (expert parallelism needs every rank's backward).

On CUDA with Triton every step is a kernel (`moe`, `moe_train`, `fp8`); elsewhere each step runs its
torch reference, so the function trains anywhere. Call it through `ops.grouped_swiglu_fp8_training`.
"""

from __future__ import annotations

import torch

from dsv3.kernels import reference

# Shapes (legend in README.md): N rows grouped by expert, T source rows (with `rows_N`), D hidden, F expert
# width, E experts. "qt/st": a grouped column quantization ([features, capacity * 128], [features, capacity]).


def _transpose_fp8(q: torch.Tensor) -> torch.Tensor:
    """Contiguous transpose of the last two dims of an FP8 tensor, copied as bytes."""
    return q.view(torch.uint8).transpose(-2, -1).contiguous().view(q.dtype)


class _Steps:
    """The forward and backward steps, on the Triton kernels or on the torch reference."""

    def __init__(self, use_triton: bool, scale_fmt: str | None) -> None:
        self.triton = use_triton
        self.scale_fmt = scale_fmt

    def quant(
        self,
        x: torch.Tensor,
        offsets_E: torch.Tensor,
        *,
        rows: torch.Tensor | None = None,
        colwise: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """1x128 quantization of x (or x[rows]) and, with `colwise`, its grouped 128x1 one."""
        if self.triton:
            from dsv3.kernels import moe_train

            q, s, qt, st = moe_train.grouped_quant(
                x, offsets_E, rows=rows, colwise=colwise, scale_fmt=self.scale_fmt
            )
            return q, s, qt, st
        values = x if rows is None else x.index_select(0, rows)
        q, s = reference.act_quant(values, scale_fmt=self.scale_fmt)
        qt = st = None
        if colwise:
            qt, st = reference.grouped_col_quant(values, offsets_E, scale_fmt=self.scale_fmt)
        return q, s, qt, st

    def weight_quant(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_q, w_s) per 128x128 block, and the transpose (wt_q, wt_s) for the dgrad GEMM."""
        w = w.detach().contiguous()
        if self.triton:
            from dsv3.kernels import fp8

            q, s, qt = fp8.weight_quant(w, scale_fmt=self.scale_fmt, transposed=True)
        else:
            q, s = reference.weight_quant(w, scale_fmt=self.scale_fmt)
            qt = _transpose_fp8(q)
        return q, s, qt, s.transpose(-2, -1).contiguous()

    def gate_up(
        self,
        x_q: torch.Tensor,
        x_s: torch.Tensor,
        w_q: torch.Tensor,
        w_s: torch.Tensor,
        offsets_E: torch.Tensor,
        out_dtype: torch.dtype,
        row_weights_N: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h = w * silu(gate) * up [N, F], pre-activations [gate | up] [N, 2F]), both `out_dtype`."""
        if self.triton:
            from dsv3.kernels import moe

            return moe.gate_up_fp8_with_pre(x_q, x_s, w_q, w_s, offsets_E, out_dtype, row_weights_N)
        pre = reference.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets_E, out_dtype=torch.float32)
        h = reference.swiglu(pre)
        if row_weights_N is not None:
            h = h * row_weights_N.float()[:, None]
        return h.to(out_dtype), pre.to(out_dtype)

    def gemm(
        self,
        x_q: torch.Tensor,
        x_s: torch.Tensor,
        w_q: torch.Tensor,
        w_s: torch.Tensor,
        offsets_E: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        if self.triton:
            from dsv3.kernels import moe

            return moe.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets_E, out_dtype)
        return reference.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets_E, out_dtype)

    def swiglu_backward(
        self,
        grad_NF: torch.Tensor,
        pre_N2F: torch.Tensor,
        row_weights_N: torch.Tensor | None,
        offsets_E: torch.Tensor,
        *,
        colwise: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """d[gate | up] in both quantizations, and the row weights' gradient (float32)."""
        if self.triton:
            from dsv3.kernels import moe_train

            return moe_train.swiglu_backward_quant(
                grad_NF, pre_N2F, row_weights_N, offsets_E, colwise=colwise, scale_fmt=self.scale_fmt
            )
        grad_N2F, grad_w = reference.swiglu_backward(grad_NF, pre_N2F, row_weights_N)
        q, s, qt, st = self.quant(grad_N2F, offsets_E, colwise=colwise)
        return q, s, qt, st, grad_w

    def wgrad(
        self,
        a_qt: torch.Tensor,
        a_st: torch.Tensor,
        b_qt: torch.Tensor,
        b_st: torch.Tensor,
        offsets_E: torch.Tensor,
    ) -> torch.Tensor:
        if self.triton:
            from dsv3.kernels import moe_train

            return moe_train.grouped_wgrad_fp8(a_qt, a_st, b_qt, b_st, offsets_E)
        return reference.grouped_wgrad_fp8(a_qt, a_st, b_qt, b_st, offsets_E)


class FP8GroupedSwiGLU(torch.autograd.Function):
    """out = down_e(w * silu(gate_e(x)) * up_e(x)) per expert, forward and backward in FP8 (module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        rows_N: torch.Tensor | None,
        counts_E: torch.Tensor,
        w_gate_up_E2FD: torch.Tensor,
        w_down_EDF: torch.Tensor,
        row_weights_N: torch.Tensor | None,
        steps: _Steps,
    ) -> torch.Tensor:
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        need_x, need_wgu, need_wd = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        weights = row_weights_N.contiguous() if row_weights_N is not None else None
        x_q, x_s, xt_q, xt_s = steps.quant(x.contiguous(), offsets_E, rows=rows_N, colwise=need_wgu)
        wgu_q, wgu_s, wgut_q, wgut_s = steps.weight_quant(w_gate_up_E2FD)
        wd_q, wd_s, wdt_q, wdt_s = steps.weight_quant(w_down_EDF)
        h_NF, pre_N2F = steps.gate_up(x_q, x_s, wgu_q, wgu_s, offsets_E, x.dtype, weights)
        h_q, h_s, ht_q, ht_s = steps.quant(h_NF, offsets_E, colwise=need_wd)
        out_ND = steps.gemm(h_q, h_s, wd_q, wd_s, offsets_E, x.dtype)
        ctx.save_for_backward(
            offsets_E, rows_N, weights, xt_q, xt_s, ht_q, ht_s, pre_N2F, wgut_q, wgut_s, wdt_q, wdt_s
        )
        ctx.steps = steps
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtypes = (w_gate_up_E2FD.dtype, w_down_EDF.dtype)
        ctx.need = (need_x, need_wgu, need_wd)
        return out_ND

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (offsets_E, rows_N, weights, xt_q, xt_s, ht_q, ht_s, pre_N2F, wgut_q, wgut_s, wdt_q, wdt_s) = (
            ctx.saved_tensors
        )
        steps: _Steps = ctx.steps
        need_x, need_wgu, need_wd = ctx.need
        need_w = ctx.needs_input_grad[5]
        g_q, g_s, gt_q, gt_s = steps.quant(grad_out.contiguous(), offsets_E, colwise=need_wd)
        grad_x = grad_wgu = grad_wd = grad_w = None
        if need_wd:
            grad_wd = steps.wgrad(gt_q, gt_s, ht_q, ht_s, offsets_E).to(ctx.w_dtypes[1])
        if need_x or need_wgu or need_w:
            grad_h = steps.gemm(g_q, g_s, wdt_q, wdt_s, offsets_E, torch.float32)
            d_q, d_s, dt_q, dt_s, grad_w = steps.swiglu_backward(
                grad_h, pre_N2F, weights, offsets_E, colwise=need_wgu
            )
            if need_x:
                grad_x = steps.gemm(d_q, d_s, wgut_q, wgut_s, offsets_E, ctx.x_dtype)
                if rows_N is not None:  # the fused permutation: sum each source row's copies
                    grad_x = grad_x.new_zeros(ctx.x_shape, dtype=torch.float32).index_add_(
                        0, rows_N, grad_x.float()
                    )
                    grad_x = grad_x.to(ctx.x_dtype)
            if need_wgu:
                grad_wgu = steps.wgrad(dt_q, dt_s, xt_q, xt_s, offsets_E).to(ctx.w_dtypes[0])
            if need_w and grad_w is not None:
                grad_w = grad_w.to(weights.dtype)
        return grad_x, None, None, grad_wgu, grad_wd, grad_w if need_w else None, None


def grouped_swiglu_fp8_training(
    x: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    row_weights_N: torch.Tensor | None = None,
    *,
    rows_N: torch.Tensor | None = None,
    scale_fmt: str | None = None,
    use_triton: bool,
) -> torch.Tensor:
    """Validated by `ops.grouped_swiglu_fp8_training`; see the module doc."""
    steps = _Steps(use_triton, scale_fmt)
    return FP8GroupedSwiGLU.apply(x, rows_N, counts_E, w_gate_up_E2FD, w_down_EDF, row_weights_N, steps)
