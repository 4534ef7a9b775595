"""The closed-form RMSNorm backward (`dsv3.kernels.rms_norm_grad`): its forward is bitwise the
reference's, its gradients are autograd's of the reference (float32 rounding; exact derivative by
gradcheck in float64), and `ops.rms_norm` takes it only for float32 training."""

from __future__ import annotations

import pytest
import torch

from dsv3.kernels import ops, reference, rms_norm_grad


def _inputs(shape=(3, 7, 64), dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 3
    weight = torch.randn(shape[-1], generator=generator, dtype=dtype)
    return x, weight


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_forward_is_the_reference_and_gradients_are_autograds(grads) -> None:
    x, weight = _inputs()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for norm in (reference.rms_norm, rms_norm_grad.rms_norm):
        xi = x.clone().requires_grad_(grads[0])
        wi = weight.clone().requires_grad_(grads[1])
        out = norm(xi, wi, 1e-6)
        out.backward(upstream)
        results.append((out.detach(), xi.grad, wi.grad))
    (ref_out, ref_dx, ref_dw), (out, dx, dw) = results
    assert torch.equal(out, ref_out)
    for mine, theirs, wanted in ((dx, ref_dx, grads[0]), (dw, ref_dw, grads[1])):
        if wanted:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        else:
            assert mine is None and theirs is None


def test_the_backward_is_the_exact_derivative() -> None:
    x, weight = _inputs((2, 5, 16), torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: rms_norm_grad.rms_norm(a, b, 1e-6), (x.requires_grad_(), weight.requires_grad_())
    )


def test_ops_takes_it_for_float32_training_only(monkeypatch) -> None:
    monkeypatch.setenv("DSV3_CPU_KERNELS", "0")  # else the fused CPU kernel (tests/kernels/test_cpu_fused.py)
    x, weight = _inputs()
    weight.requires_grad_()
    assert type(ops.rms_norm(x, weight, 1e-6).grad_fn)._forward_cls is rms_norm_grad._RMSNorm
    bf16 = ops.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-6).grad_fn
    assert getattr(type(bf16), "_forward_cls", None) is not rms_norm_grad._RMSNorm
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
