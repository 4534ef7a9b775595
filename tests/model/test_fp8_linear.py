"""FP8Linear: forward and both gradients are the quantized GEMMs of the DeepSeek-V3 recipe."""

import pytest
import torch
from torch import nn

from dsv3.kernels import ops, reference
from dsv3.model.fp8_linear import FP8Linear


def _quantized_gemm(a: torch.Tensor, b: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    """a @ b.T in fp32 with a per 1x128 and b per 128x128 (b_blocks) or 1x128 tiles, via the reference."""
    a_q, a_s = reference.act_quant(a.contiguous())
    b_q, b_s = reference.weight_quant(b.contiguous()) if b_blocks else reference.act_quant(b.contiguous())
    return reference.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad, module.weight.grad


def test_forward_and_gradients_are_the_fp8_recipe(rel_err) -> None:
    linear = nn.Linear(320, 200, bias=False)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(2, 75, 320)  # 150 tokens: a partial 128-token tile in the weight-gradient GEMM
    grad = torch.randn(2, 75, 200)
    y, gx, gw = _run(fp8, x, grad)
    x2, g2 = x.reshape(150, 320), grad.reshape(150, 200)
    w = linear.weight.detach()
    torch.testing.assert_close(y.reshape(150, 200), _quantized_gemm(x2, w, b_blocks=True), rtol=0, atol=0)
    # dgrad: dy per 1x128 along out features, W^T per 128x128 block
    torch.testing.assert_close(gx.reshape(150, 320), _quantized_gemm(g2, w.T, b_blocks=True), rtol=0, atol=0)
    # wgrad: dy and x per 128x1 along tokens (1x128 tiles of the transposes)
    torch.testing.assert_close(gw, _quantized_gemm(g2.T, x2.T, b_blocks=False), rtol=0, atol=0)

    y_ref, gx_ref, gw_ref = _run(linear, x, grad)
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert 1e-3 < rel_err(got, want) < 0.06  # FP8 rounding, and really quantized


def test_transposed_blocks_equal_quantizing_the_transpose() -> None:
    """dgrad reuses W's 128x128 quantization, transposed: identical to quantizing W^T (square blocks)."""
    w = torch.randn(200, 320)
    w_q, w_s = reference.weight_quant(w)
    wt_q, wt_s = reference.weight_quant(w.T.contiguous())
    assert torch.equal(w_q.view(torch.uint8).T, wt_q.view(torch.uint8)) and torch.equal(w_s.T, wt_s)


def test_module_is_a_linear_drop_in(rel_err) -> None:
    linear = nn.Linear(256, 128, bias=True)
    fp8 = FP8Linear.from_linear(linear)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    assert fp8.state_dict().keys() == linear.state_dict().keys()
    fresh = FP8Linear(256, 128, bias=True)
    fresh.load_state_dict(linear.state_dict())
    x = torch.randn(4, 256)
    torch.testing.assert_close(fresh(x), fp8(x))
    assert rel_err(fp8(x), linear(x)) < 0.06
    assert fp8(torch.randn(256)).shape == (128,)
    with pytest.raises(ValueError, match="scale_fmt"):
        FP8Linear(256, 128, scale_fmt="e5m2")


def test_gradients_flow_separately() -> None:
    fp8 = FP8Linear(128, 64)
    x = torch.randn(10, 128, requires_grad=True)
    fp8.weight.requires_grad_(False)
    fp8(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and fp8.weight.grad is None
    fp8.weight.requires_grad_(True)
    fp8(torch.randn(10, 128)).square().sum().backward()
    assert fp8.weight.grad is not None and fp8.weight.grad.abs().sum() > 0


def test_training_tracks_fp32_training() -> None:
    target = nn.Linear(256, 128, bias=False)
    x = torch.randn(256, 256)
    with torch.no_grad():
        y = target(x)
    final = {}
    for cls in (nn.Linear, FP8Linear):
        torch.manual_seed(1)
        model = cls(256, 128, bias=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            optimizer.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            optimizer.step()
        final[cls] = loss.item()
    assert final[FP8Linear] < 0.02  # from ~0.65
    assert final[FP8Linear] < 3 * final[nn.Linear]


def test_bf16_master_weight_and_input() -> None:
    fp8 = FP8Linear(128, 256, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    y.sum().backward()
    assert (
        y.dtype == torch.bfloat16
        and x.grad.dtype == torch.bfloat16
        and fp8.weight.grad.dtype == torch.bfloat16
    )


def test_triton_path_matches_reference_path(triton_backend, device, rel_err, fp8_dot_tol) -> None:
    linear = nn.Linear(256, 192, bias=False, device=device)
    fp8 = FP8Linear.from_linear(linear)
    x, grad = torch.randn(40, 256, device=device), torch.randn(40, 192, device=device)
    got = _run(fp8, x, grad)
    with ops.force_backend("torch"):
        want = _run(fp8, x, grad)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < fp8_dot_tol


def test_from_fp8_checkpoint_pair() -> None:
    w = torch.randn(200, 300)
    w_q, w_s = reference.weight_quant(w)
    module = FP8Linear.from_fp8(w_q, w_s, dtype=torch.float32)
    assert module.weight.shape == (200, 300)
    torch.testing.assert_close(
        module.weight.detach(), reference.weight_dequant(w_q, w_s, dtype=torch.float32)
    )
