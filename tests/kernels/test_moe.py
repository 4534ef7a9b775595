"""MoE expert kernels on rows grouped by expert: grouped GEMMs (bf16/fp32 and FP8) and the SwiGLU FFN."""

import pytest
import torch

from dsv3.kernels import ops, reference

COUNTS = [0, 1, 127, 129, 0, 5]  # rows per expert: empty experts, single rows, around a 64/128 boundary


def _offsets(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_kernel(triton_backend, device, rel_err, dtype) -> None:
    x = torch.randn(sum(COUNTS), 96, device=device, dtype=dtype)  # K = 96: ragged for BLOCK_K 64
    w = torch.randn(len(COUNTS), 80, 96, device=device, dtype=dtype)  # O = 80: ragged for BLOCK_N
    offsets = _offsets(COUNTS, device)
    out = ops.grouped_gemm(x, w, offsets)
    expected = reference.grouped_gemm(x, w, offsets)
    assert out.shape == (sum(COUNTS), 80) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(
        out.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item()
    )
    # each expert used its own weights
    lo = COUNTS[0] + COUNTS[1]
    assert rel_err(out[lo : lo + COUNTS[2]], x[lo : lo + COUNTS[2]] @ w[2].T) < 1e-2


@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_grouped_gemm_kernel_row_tiles(
    triton_backend, device, tiled_randn, rel_err, fp8_dot_tol, block_m
) -> None:
    """Every row-tile height maps tiles to experts correctly (129 rows = one full 128 tile + 1 row)."""
    from dsv3.kernels import moe

    x, w = torch.randn(sum(COUNTS), 64, device=device), torch.randn(len(COUNTS), 48, 64, device=device)
    offsets = _offsets(COUNTS, device)
    out = moe.grouped_gemm(x, w, offsets, block_m=block_m)
    assert rel_err(out, reference.grouped_gemm(x, w, offsets)) < 1e-5
    x_q, x_s = reference.act_quant(tiled_randn(sum(COUNTS), 128, device=device))
    w_q, w_s = reference.weight_quant(w.repeat(1, 1, 2))
    out8 = moe.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets, torch.float32, block_m=block_m)
    assert rel_err(out8, reference.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets, torch.float32)) < fp8_dot_tol


def test_grouped_gemm_kernel_fused_swiglu(triton_backend, device, rel_err) -> None:
    from dsv3.kernels import moe

    counts = [3, 0, 70]
    x, w = torch.randn(73, 128, device=device), torch.randn(3, 2 * 72, 128, device=device)
    offsets, row_weights = _offsets(counts, device), torch.rand(73, device=device)
    out = moe.grouped_gemm(x, w, offsets, swiglu=True, row_weights_N=row_weights)
    expected = reference.swiglu(reference.grouped_gemm(x, w, offsets)) * row_weights[:, None]
    assert out.shape == (73, 72)
    assert rel_err(out, expected) < 1e-5


def test_grouped_gemm_fp8_kernel(triton_backend, device, tiled_randn, rel_err) -> None:
    counts = [0, 1, 127, 129, 3]
    x_q, x_s = reference.act_quant(tiled_randn(sum(counts), 200, device=device))
    w_q, w_s = reference.weight_quant(torch.randn(len(counts), 300, 200, device=device))
    offsets = _offsets(counts, device)
    out = ops.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets, out_dtype=torch.float32)
    expected = reference.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets, out_dtype=torch.float32)
    assert rel_err(out, expected) < 1e-5
    row_scale = expected.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # rows span 6 decades
    assert ((out - expected).abs() / row_scale).max() < 1e-5
    out16 = ops.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, expected) < 1e-2


def _experts(num_experts: int, hidden: int, width: int, device, dtype=torch.float32):
    w_gate_up = torch.randn(num_experts, 2 * width, hidden, device=device) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, width, device=device) / width**0.5
    return w_gate_up.to(dtype), w_down.to(dtype)


def _counts(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("counts", [[20, 0, 57, 1, 0, 72], [1, 0, 0, 0, 0, 0]])
def test_grouped_swiglu_triton_matches_reference(triton_backend, device, rel_err, dtype, tol, counts) -> None:
    x = torch.randn(sum(counts), 128, device=device, dtype=dtype)
    w_gate_up, w_down = _experts(6, 128, 96, device, dtype)
    row_weights = torch.rand(sum(counts), device=device)
    for weights in (None, row_weights):
        out = ops.grouped_swiglu(x, _counts(counts, device), w_gate_up, w_down, weights)
        with ops.force_backend("torch"):
            expected = ops.grouped_swiglu(x, _counts(counts, device), w_gate_up, w_down, weights)
        assert out.shape == x.shape and out.dtype == dtype
        assert rel_err(out, expected) < tol
    out = ops.grouped_swiglu(x, _counts(counts, device), w_gate_up, w_down)
    # by hand for one expert: its rows used its own weights
    lo, hi = counts[0], counts[0] + counts[2]
    if hi > lo:
        gate, up = (x[lo:hi].float() @ w_gate_up[2].float().T).chunk(2, dim=-1)
        by_hand = (torch.nn.functional.silu(gate) * up) @ w_down[2].float().T
        assert rel_err(out[lo:hi], by_hand) < tol


def test_grouped_swiglu_no_rows(triton_backend, device) -> None:
    w_gate_up, w_down = _experts(4, 128, 64, device)
    out = ops.grouped_swiglu(torch.empty(0, 128, device=device), _counts([0] * 4, device), w_gate_up, w_down)
    assert out.shape == (0, 128)


def test_grouped_swiglu_uses_reference_when_gradients_are_needed(triton_backend, device) -> None:
    w_gate_up, w_down = _experts(4, 128, 64, device)
    w_gate_up.requires_grad_(True)
    out = ops.grouped_swiglu(
        torch.randn(8, 128, device=device), _counts([3, 0, 4, 1], device), w_gate_up, w_down
    )
    out.sum().backward()
    assert w_gate_up.grad is not None and w_gate_up.grad[[0, 2, 3]].abs().sum() > 0
    assert not w_gate_up.grad[1].any()  # the empty expert


def test_grouped_swiglu_fp8(triton_backend, device, rel_err) -> None:
    counts = [13, 0, 22, 1, 9, 5]
    x = torch.randn(sum(counts), 256, device=device, dtype=torch.bfloat16)
    w_gate_up, w_down = _experts(6, 256, 160, device)  # F = 160: a 128-block straddles gate and up rows
    (wgu_q, wgu_s), (wd_q, wd_s) = reference.weight_quant(w_gate_up), reference.weight_quant(w_down)
    weights = torch.rand(sum(counts), device=device) + 0.5
    out = ops.grouped_swiglu_fp8(x, _counts(counts, device), wgu_q, wgu_s, wd_q, wd_s, weights)
    expected = reference.grouped_swiglu_fp8(x, _counts(counts, device), wgu_q, wgu_s, wd_q, wd_s, weights)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert rel_err(out, expected) < 1e-2
    # and the FP8 experts approximate the unquantized ones
    exact = reference.grouped_swiglu(x.float(), _counts(counts, device), w_gate_up, w_down, weights)
    assert rel_err(out, exact) < 0.1


# ---- GPU: the benchmark's layer ------------------------------------------------------------------------


@pytest.mark.gpu
def test_grouped_swiglu_gpu_deepseek_layer(rel_err) -> None:
    """64 experts, top-6, hidden 2048, width 1408, 4096 tokens (as in benchmarks/bench_kernels.py)."""
    num_tokens, top_k, num_experts, hidden, width = 4096, 6, 64, 2048, 1408
    ids = torch.rand(num_tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    x = torch.randn(num_tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
    w_gate_up, w_down = _experts(num_experts, hidden, width, "cuda", torch.bfloat16)
    with ops.force_backend("triton"):
        out = ops.grouped_swiglu(x, counts, w_gate_up, w_down)
        again = ops.grouped_swiglu(x, counts, w_gate_up, w_down)
    expected = reference.grouped_swiglu(x.float(), counts.cpu(), w_gate_up.float(), w_down.float())
    assert torch.equal(out, again)  # no atomics: deterministic
    assert rel_err(out, expected) < 1e-2
    (wgu_q, wgu_s), (wd_q, wd_s) = ops.weight_quant(w_gate_up), ops.weight_quant(w_down)
    with ops.force_backend("triton"):
        out8 = ops.grouped_swiglu_fp8(x, counts, wgu_q, wgu_s, wd_q, wd_s)
    expected8 = reference.grouped_swiglu_fp8(x, counts, wgu_q, wgu_s, wd_q, wd_s)
    assert rel_err(out8, expected8) < 1e-2
    print(f"moe fp8 vs bf16 reference: {rel_err(out8, expected):.2e}")
    assert rel_err(out8, expected) < 0.1
