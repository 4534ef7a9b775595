"""MoE expert kernels: permutation, grouped GEMMs (bf16/fp32 and FP8), combine, the whole expert layer."""

import pytest
import torch

from dsv3.kernels import ops, reference

COUNTS = [0, 1, 127, 129, 0, 5]  # rows per expert: empty experts, single rows, around a 64/128 boundary


def _offsets(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def _routing(num_tokens: int, top_k: int, num_experts: int, device, skip: int | None = None):
    """Distinct experts per token (like a real top-k); expert `skip` gets no token."""
    allowed = [e for e in range(num_experts) if e != skip]
    scores = torch.rand(num_tokens, len(allowed))
    ids = torch.tensor(allowed)[scores.topk(top_k, dim=-1).indices]
    return ids.to(device), torch.rand(num_tokens, top_k, device=device)


def test_moe_permute_groups_rows_by_expert_in_token_order(device) -> None:
    ids, _ = _routing(40, 3, 6, device, skip=4)
    order, offsets = ops.moe_permute(ids, 6)
    assert offsets.dtype == torch.int32 and offsets.tolist()[-1] == 120
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=6)
    assert torch.equal(offsets.cpu(), counts.cumsum(0).to(torch.int32).cpu())
    assert offsets[4] == offsets[3]  # the empty expert
    sorted_ids = flat[order]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()
    for e, (lo, hi) in enumerate(zip([0, *offsets.tolist()[:-1]], offsets.tolist(), strict=True)):
        rows = order[lo:hi]
        assert (flat[rows] == e).all() and (rows[1:] > rows[:-1]).all()


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
    out = moe.grouped_gemm(x, w, offsets, swiglu_weights_N=row_weights)
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


@pytest.mark.parametrize("weighted", [False, True])
def test_moe_combine_kernel(triton_backend, device, weighted) -> None:
    num_tokens, top_k = 37, 3
    rows = torch.randn(num_tokens * top_k, 160, device=device)
    order = torch.randperm(num_tokens * top_k, device=device)
    weights = torch.rand(num_tokens, top_k, device=device) if weighted else None
    out = ops.moe_combine(rows, order, num_tokens, top_k, weights)
    # by hand: row i of `rows` holds (token, slot) = divmod(order[i], top_k)
    expected = torch.zeros(num_tokens, 160, device=device)
    for i, flat in enumerate(order.tolist()):
        t, k = divmod(flat, top_k)
        expected[t] += rows[i] * (weights[t, k] if weighted else 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.moe_combine(rows, order, num_tokens, top_k, weights), expected)


def _experts(num_experts: int, hidden: int, width: int, device, dtype=torch.float32):
    w_gate_up = torch.randn(num_experts, 2 * width, hidden, device=device) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, width, device=device) / width**0.5
    return w_gate_up.to(dtype), w_down.to(dtype)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_tokens", [50, 1])
def test_moe_experts_triton_matches_reference(
    triton_backend, device, rel_err, dtype, tol, num_tokens
) -> None:
    ids, weights = _routing(num_tokens, 3, 6, device, skip=4)
    x = torch.randn(num_tokens, 128, device=device, dtype=dtype)
    w_gate_up, w_down = _experts(6, 128, 96, device, dtype)
    out = ops.moe_experts(x, ids, weights, w_gate_up, w_down)
    with ops.force_backend("torch"):
        expected = ops.moe_experts(x, ids, weights, w_gate_up, w_down)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, expected) < tol


def test_moe_experts_no_tokens(triton_backend, device) -> None:
    w_gate_up, w_down = _experts(4, 128, 64, device)
    ids = torch.empty(0, 2, dtype=torch.int64, device=device)
    out = ops.moe_experts(
        torch.empty(0, 128, device=device), ids, torch.empty(0, 2, device=device), w_gate_up, w_down
    )
    assert out.shape == (0, 128)


def test_moe_experts_uses_reference_when_gradients_are_needed(triton_backend, device) -> None:
    ids, weights = _routing(8, 2, 4, device)
    w_gate_up, w_down = _experts(4, 128, 64, device)
    w_gate_up.requires_grad_(True)
    out = ops.moe_experts(torch.randn(8, 128, device=device), ids, weights, w_gate_up, w_down)
    out.sum().backward()
    assert w_gate_up.grad is not None and w_gate_up.grad.abs().sum() > 0


def test_moe_experts_fp8(triton_backend, device, rel_err) -> None:
    ids, weights = _routing(50, 3, 6, device, skip=4)
    x = torch.randn(50, 256, device=device, dtype=torch.bfloat16)
    w_gate_up, w_down = _experts(6, 256, 160, device)  # F = 160: a 128-block straddles gate and up rows
    (wgu_q, wgu_s), (wd_q, wd_s) = reference.weight_quant(w_gate_up), reference.weight_quant(w_down)
    out = ops.moe_experts_fp8(x, ids, weights, wgu_q, wgu_s, wd_q, wd_s)
    expected = reference.moe_experts_fp8(x, ids, weights, wgu_q, wgu_s, wd_q, wd_s)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert rel_err(out, expected) < 1e-2
    # and the FP8 layer approximates the unquantized one
    exact = reference.moe_experts(x.float(), ids, weights, w_gate_up, w_down)
    assert rel_err(out, exact) < 0.1


# ---- GPU: the benchmark's layer ------------------------------------------------------------------------


@pytest.mark.gpu
def test_moe_experts_gpu_deepseek_layer(rel_err) -> None:
    """64 experts, top-6, hidden 2048, width 1408, 4096 tokens (as in benchmarks/bench_kernels.py)."""
    num_tokens, top_k, num_experts, hidden, width = 4096, 6, 64, 2048, 1408
    ids, weights = _routing(num_tokens, top_k, num_experts, "cuda")
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w_gate_up, w_down = _experts(num_experts, hidden, width, "cuda", torch.bfloat16)
    with ops.force_backend("triton"):
        out = ops.moe_experts(x, ids, weights, w_gate_up, w_down)
        again = ops.moe_experts(x, ids, weights, w_gate_up, w_down)
    expected = reference.moe_experts(x.float(), ids, weights, w_gate_up.float(), w_down.float())
    assert torch.equal(out, again)  # no atomics: deterministic
    assert rel_err(out, expected) < 1e-2
    (wgu_q, wgu_s), (wd_q, wd_s) = ops.weight_quant(w_gate_up), ops.weight_quant(w_down)
    with ops.force_backend("triton"):
        out8 = ops.moe_experts_fp8(x, ids, weights, wgu_q, wgu_s, wd_q, wd_s)
    expected8 = reference.moe_experts_fp8(x, ids, weights, wgu_q, wgu_s, wd_q, wd_s)
    assert rel_err(out8, expected8) < 1e-2
    print(f"moe fp8 vs bf16 reference: {rel_err(out8, expected):.2e}")
    assert rel_err(out8, expected) < 0.1
