"""`FP8Linear`: an nn.Linear drop-in whose three GEMMs run in FP8, as in DeepSeek-V3 mixed-precision training.

The master weight stays in its own dtype (fp32 or bf16) under the usual name `.weight`, shape [out, in];
every call quantizes what each GEMM needs (DeepSeek-V3 report, section 3.3, figure 7):

- forward  y = x @ W.T:   x per 1x128 tile along `in`, W per 128x128 block;
- dgrad    dx = dy @ W:   dy per 1x128 tile along `out`, W^T per 128x128 block (W's blocks, transposed);
- wgrad    dW = dy.T @ x: dy and x re-quantized per 128x1 tile along the token dimension (1x128 tiles of
                          their transposes), so the K of this GEMM (tokens) is tiled like any other.

The activation for wgrad is cached in that FP8 128x1 form (quantized in the forward, only when the weight
needs a gradient), as the report caches Linear inputs in FP8. All GEMMs accumulate in FP32 (`ops.fp8_gemm`);
dW is returned in fp32 then cast to the weight's dtype. On the CPU the ops run their torch reference
(dequantize, fp32 matmul), so the module trains anywhere; on CUDA they run the FP8 kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dsv3.kernels import ops

# Shapes (legend in README.md): T tokens (all leading dims flattened), I input and O output features.


def _transpose_q(q: torch.Tensor) -> torch.Tensor:
    """Contiguous transpose of an FP8 matrix, copied as bytes (not every FP8 copy kernel exists)."""
    return q.view(torch.uint8).t().contiguous().view(q.dtype)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:  # type: ignore[override]
        x_TI = x.reshape(-1, x.shape[-1]).contiguous()
        w_q, w_s = ops.weight_quant(weight.detach().contiguous(), scale_fmt=scale_fmt)
        y = ops.fp8_linear(x_TI, w_q, w_s, out_dtype=x.dtype, scale_fmt=scale_fmt)
        if ctx.needs_input_grad[1]:
            xt_q, xt_s = ops.act_quant(x_TI.t().contiguous(), scale_fmt=scale_fmt)  # 128x1 along tokens
        else:
            xt_q = xt_s = None
        ctx.save_for_backward(w_q, w_s, xt_q, xt_s)
        ctx.scale_fmt = scale_fmt
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        w_q, w_s, xt_q, xt_s = ctx.saved_tensors
        grad_TO = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = ops.act_quant(grad_TO, scale_fmt=ctx.scale_fmt)  # 1x128 along out features
            grad_x = ops.fp8_gemm(g_q, g_s, _transpose_q(w_q), w_s.t().contiguous(), out_dtype=ctx.x_dtype)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # 128x1 along tokens
            gt_q, gt_s = ops.act_quant(grad_TO.t().contiguous(), scale_fmt=ctx.scale_fmt)
            grad_w = ops.fp8_gemm(gt_q, gt_s, xt_q, xt_s, out_dtype=torch.float32).to(ctx.w_dtype)
        return grad_x, grad_w, None


class FP8Linear(nn.Module):
    """y = x @ weight.T (+ bias) with FP8 GEMMs in forward and backward; see the module doc.

    Same parameter names and shapes as `nn.Linear`; the bias (optional) is added in the input's dtype.
    `scale_fmt="ue8m0"` rounds every scale up to a power of two.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        scale_fmt: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"FP8Linear: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
        self.in_features, self.out_features, self.scale_fmt = in_features, out_features, scale_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None) -> FP8Linear:
        """An FP8Linear sharing `linear`'s parameters (an optimizer holding them keeps working)."""
        module = cls(linear.in_features, linear.out_features, scale_fmt=scale_fmt, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    @classmethod
    def from_fp8(
        cls,
        weight: torch.Tensor,
        weight_scale_inv: torch.Tensor,
        *,
        dtype: torch.dtype = torch.bfloat16,
        scale_fmt: str | None = None,
    ) -> FP8Linear:
        """From a released-checkpoint pair (`weight` e4m3 [out, in], `weight_scale_inv` 128x128 scales)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, scale_fmt=scale_fmt, device=weight.device, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(
                ops.weight_dequant(weight, weight_scale_inv.float().contiguous(), dtype=dtype)
            )
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FP8LinearFunction.apply(x, self.weight, self.scale_fmt)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale_fmt={self.scale_fmt}"
        )


def convert_to_fp8(
    module: nn.Module,
    *,
    keep: Callable[[str], bool] = lambda name: False,
    scale_fmt: str | None = None,
    routed_experts: bool = True,
) -> list[str]:
    """Swap every `nn.Linear` under `module` for an `FP8Linear` sharing its parameters, in place, and
    (with `routed_experts`) switch every `GroupedExperts` to FP8 (`GroupedExperts.enable_fp8`).

    `keep(name)` leaves the named module as it is. Parameters, their names and the state dict are unchanged
    (checkpoints and an optimizer built before the swap keep working). Returns the converted names.
    """
    from dsv3.model.moe import GroupedExperts  # moe imports the kernels' ops, as this module does

    swapped = []
    for name, child in list(module.named_modules()):
        if keep(name):
            continue
        if isinstance(child, GroupedExperts):
            if routed_experts and not child.fp8:
                child.enable_fp8(scale_fmt)
                swapped.append(name)
            continue
        if type(child) is not nn.Linear:
            continue
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attribute, FP8Linear.from_linear(child, scale_fmt))
        swapped.append(name)
    return swapped
