"""FP8 training of the grouped experts: each new kernel against its torch reference (interpreted on the CPU)
on ragged groups (0, 1, 127, 129 rows per expert), and the FP8 backward against fp32 autograd."""

import pytest
import torch

from dsv3.kernels import ops, reference
from dsv3.kernels.ops import KernelInputError

COUNTS = [0, 1, 127, 129, 0, 5]  # empty experts, a single row, one row short of / past a 128-row tile


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _used_tiles(counts: list[int]) -> int:
    return int(reference.grouped_tile_end(_offsets(counts))[-1])


def test_grouped_col_quant_reference_layout() -> None:
    """The reference layout itself: tiles restart at each expert, padding is zero, scales per feature."""
    counts = [3, 0, 130]
    x = torch.randn(sum(counts), 5)
    qt, st = reference.grouped_col_quant(x, _offsets(counts), out_dtype=torch.float32)
    assert qt.shape == (5, (2 + 3) * 128) and st.shape == (5, 5)  # capacity ceil(133/128) + 3 experts
    torch.testing.assert_close(st[:, 0], x[:3].abs().amax(0) / 448)  # expert 0: one tile of 3 rows
    torch.testing.assert_close(st[:, 1], x[3:131].abs().amax(0) / 448)  # expert 2: rows 0..127
    torch.testing.assert_close(st[:, 2], x[131:].abs().amax(0) / 448)  # and its last 2 rows
    assert not qt[:, 3:128].any() and not qt[:, 258:384].any()  # zero padding inside partial tiles
    back = reference.act_dequant(qt, st)
    torch.testing.assert_close(back[:, 128:256].T, x[3:131], rtol=2**-4, atol=1e-6)


@pytest.mark.parametrize("gather", [False, True])
def test_grouped_quant_kernel(triton_backend, tiled_randn, gather: bool) -> None:
    from dsv3.kernels import moe_train

    offsets, n = _offsets(COUNTS), sum(COUNTS)
    source = tiled_randn(n + 7, 200)  # K = 200: a partial 128-column tile
    rows = torch.randperm(n + 7)[:n] if gather else None
    values = source[rows] if gather else source[:n]
    q, s, qt, st = moe_train.grouped_quant(
        source if gather else values, offsets, rows=rows, out_dtype=torch.float32
    )
    q_ref, s_ref = reference.act_quant(values, out_dtype=torch.float32)
    qt_ref, st_ref = reference.grouped_col_quant(values, offsets, out_dtype=torch.float32)
    used = _used_tiles(COUNTS)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st[:, :used], st_ref[:, :used], rtol=0, atol=0)
    torch.testing.assert_close(qt[:, : used * 128], qt_ref[:, : used * 128], rtol=1e-6, atol=1e-6)
    # fp8 through torch's cast (the kernel's own cast is wrong under the interpreter, see fp8.py)
    q8, _, qt8, _ = moe_train.grouped_quant(source if gather else values, offsets, rows=rows)
    assert q8.dtype == qt8.dtype == torch.float8_e4m3fn
    assert torch.equal(q8.float(), q_ref.to(torch.float8_e4m3fn).float())


def test_grouped_quant_kernel_only_what_is_asked(triton_backend) -> None:
    from dsv3.kernels import moe_train

    x = torch.randn(sum(COUNTS), 128)
    q, s, qt, st = moe_train.grouped_quant(x, _offsets(COUNTS), colwise=False)
    assert qt is None and st is None and q.shape == (sum(COUNTS), 128)
    q, s, qt, st = moe_train.grouped_quant(x, _offsets(COUNTS), rowwise=False)
    assert q is None and s is None and qt.shape == (128, (3 + 6) * 128)


@pytest.mark.parametrize("weighted", [False, True])
def test_swiglu_backward_quant_kernel(triton_backend, rel_err, weighted: bool) -> None:
    from dsv3.kernels import moe_train

    offsets, n, width = _offsets(COUNTS), sum(COUNTS), 96  # 2F = 192: a tile straddles gate and up
    grad, pre = torch.randn(n, width), torch.randn(n, 2 * width) * 2
    weights = torch.rand(n) + 0.1 if weighted else None
    q, s, qt, st, grad_w = moe_train.swiglu_backward_quant(
        grad, pre, weights, offsets, out_dtype=torch.float32
    )
    d_ref, grad_w_ref = reference.swiglu_backward(grad, pre, weights)
    q_ref, s_ref = reference.act_quant(d_ref, out_dtype=torch.float32)
    qt_ref, st_ref = reference.grouped_col_quant(d_ref, offsets, out_dtype=torch.float32)
    used = _used_tiles(COUNTS)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert rel_err(q, q_ref) < 1e-5
    torch.testing.assert_close(st[:, :used], st_ref[:, :used], rtol=1e-6, atol=0)
    assert rel_err(qt[:, : used * 128], qt_ref[:, : used * 128]) < 1e-5
    if weighted:
        assert rel_err(grad_w, grad_w_ref) < 1e-6
    else:
        assert grad_w is None
    # the reference itself is autograd's gradient of w * silu(gate) * up
    pre_leaf = pre.clone().requires_grad_(True)
    w_leaf = (weights if weighted else torch.ones(n)).clone().requires_grad_(True)
    (reference.swiglu(pre_leaf) * w_leaf[:, None] * grad).sum().backward()
    assert rel_err(d_ref, pre_leaf.grad) < 1e-6
    if weighted:
        assert rel_err(grad_w_ref, w_leaf.grad) < 1e-6


def test_grouped_wgrad_kernel(triton_backend, rel_err, fp8_dot_tol) -> None:
    from dsv3.kernels import moe_train

    offsets, n = _offsets(COUNTS), sum(COUNTS)
    a, b = torch.randn(n, 136), torch.randn(n, 72)  # O = 136, I = 72: partial output tiles
    a_qt, a_st = reference.grouped_col_quant(a, offsets)
    b_qt, b_st = reference.grouped_col_quant(b, offsets)
    out = moe_train.grouped_wgrad_fp8(a_qt, a_st, b_qt, b_st, offsets)
    expected = reference.grouped_wgrad_fp8(a_qt, a_st, b_qt, b_st, offsets)
    assert out.shape == (len(COUNTS), 136, 72) and out.dtype == torch.float32
    assert rel_err(out, expected) < fp8_dot_tol
    assert not out[[0, 4]].any()  # experts without rows: zero gradient, written
    lo = COUNTS[0] + COUNTS[1] + COUNTS[2]  # expert 3: 129 rows, two tiles
    assert rel_err(out[3], a[lo : lo + 129].T @ b[lo : lo + 129]) < 0.06  # e4m3 rounding of both sides


def test_weight_quant_transposed(triton_backend) -> None:
    from dsv3.kernels import fp8

    w = torch.randn(3, 200, 136)
    y, s, yt = fp8.weight_quant(w, transposed=True, out_dtype=torch.float32)
    y_ref, s_ref = reference.weight_quant(w, out_dtype=torch.float32)
    assert yt.shape == (3, 136, 200)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(yt, y.transpose(1, 2)) and torch.equal(s, s_ref)


def test_gate_up_fp8_keeps_pre_activations(triton_backend, rel_err) -> None:
    from dsv3.kernels import moe

    offsets, n = _offsets(COUNTS), sum(COUNTS)
    x_q, x_s = reference.act_quant(torch.randn(n, 128))
    w_q, w_s = reference.weight_quant(torch.randn(len(COUNTS), 2 * 80, 128) / 11)
    weights = torch.rand(n)
    h, pre = moe.gate_up_fp8_with_pre(x_q, x_s, w_q, w_s, offsets, torch.float32, weights)
    pre_ref = reference.grouped_gemm_fp8(x_q, x_s, w_q, w_s, offsets, torch.float32)
    assert rel_err(pre, pre_ref) < 1e-5
    assert rel_err(h, reference.swiglu(pre_ref) * weights[:, None]) < 1e-5


# ---- the differentiable FP8 experts ----------------------------------------------------------------


def _experts(num_experts: int, hidden: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(num_experts, 2 * width, hidden) / hidden**0.5,
        torch.randn(num_experts, hidden, width) / width**0.5,
    )


def _fp8_grads(x, counts, w_gate_up, w_down, weights, probe, rows=None):
    leaves = [t.clone().requires_grad_(True) for t in (x, w_gate_up, w_down, weights)]
    out = ops.grouped_swiglu_fp8_training(leaves[0], counts, *leaves[1:3], leaves[3], rows_N=rows)
    (out * probe).sum().backward()
    return [out.detach(), *(t.grad for t in leaves)]


def test_fp8_experts_triton_matches_torch_path(rel_err) -> None:
    """Forward and all four gradients: the Triton kernels (interpreted) against the torch steps."""
    counts = torch.tensor([*COUNTS[:4], 3])
    n, hidden, width = int(counts.sum()), 192, 80
    x, (w_gate_up, w_down) = torch.randn(n, hidden), _experts(5, hidden, width)
    weights, probe = torch.rand(n) + 0.5, torch.randn(n, hidden)
    with ops.force_backend("triton"):
        got = _fp8_grads(x, counts, w_gate_up, w_down, weights, probe)
    with ops.force_backend("torch"):
        expected = _fp8_grads(x, counts, w_gate_up, w_down, weights, probe)
    for name, a, b in zip(("out", "dx", "dw_gate_up", "dw_down", "drow_weights"), got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) < 1e-3, name  # fp32 sums in another order flip a rare FP8 rounding
    assert not got[2][0].any() and not got[3][0].any()  # expert 0 has no rows


@pytest.mark.parametrize("gather", [False, True])
def test_fp8_experts_backward_matches_fp32_autograd(triton_backend, rel_err, gather: bool) -> None:
    """Against autograd of the fp32 reference on the dequantized forward operands: only the backward's
    own FP8 quantizations (output gradients, d[gate|up], the 128x1 re-quantized activations) remain."""
    counts = torch.tensor([0, 1, 127, 129])
    n, hidden, width = int(counts.sum()), 128, 64
    w_gate_up, w_down = _experts(4, hidden, width)
    source = torch.randn(n + 5, hidden)
    rows = torch.randint(0, n + 5, (n,)) if gather else None
    x = source if gather else source[:n]
    weights, probe = torch.rand(n) + 0.5, torch.randn(n, hidden)
    got = _fp8_grads(x, counts, w_gate_up, w_down, weights, probe, rows=rows)

    def dequantized(t: torch.Tensor) -> torch.Tensor:
        return reference.weight_dequant(*reference.weight_quant(t), dtype=torch.float32)

    leaves = [t.clone().requires_grad_(True) for t in (x, w_gate_up, w_down, weights)]
    x_rows = leaves[0][rows] if gather else leaves[0]
    x_deq = x_rows + (reference.act_dequant(*reference.act_quant(x_rows.detach())) - x_rows.detach())
    w_gu = leaves[1] + (dequantized(w_gate_up) - w_gate_up)  # straight through: grads reach the masters
    w_d = leaves[2] + (dequantized(w_down) - w_down)
    out = reference.grouped_swiglu(x_deq, counts, w_gu, w_d, leaves[3])
    (out * probe).sum().backward()
    expected = [out.detach(), *(t.grad for t in leaves)]
    assert rel_err(got[0], expected[0]) < 0.05  # the down GEMM's input quantization
    for name, a, b in zip(
        ("dx", "dw_gate_up", "dw_down", "drow_weights"), got[1:], expected[1:], strict=True
    ):
        assert rel_err(a, b) < 0.08, name
    for e in (2, 3):  # each expert's gradient on its own (a misplaced tile would be off by O(1))
        assert rel_err(got[2][e], expected[2][e]) < 0.08 and rel_err(got[3][e], expected[3][e]) < 0.08
    assert not got[2][0].any() and not got[3][0].any()


def test_fp8_experts_without_rows_give_zero_weight_gradients() -> None:
    """An expert-parallel rank that receives no rows still joins the backward, with zero gradients."""
    w_gate_up, w_down = (t.requires_grad_(True) for t in _experts(3, 128, 32))
    x = torch.empty(0, 128, requires_grad=True)
    with ops.force_backend("triton"):
        out = ops.grouped_swiglu_fp8_training(x, torch.zeros(3, dtype=torch.long), w_gate_up, w_down)
    assert out.shape == (0, 128)
    out.sum().backward()
    assert w_gate_up.grad is not None and not w_gate_up.grad.any() and not w_down.grad.any()
    assert x.grad.shape == (0, 128)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, c, a, b: ops.grouped_swiglu_fp8_training(x, c[:-1], a, b), "one entry per expert"),
        (lambda x, c, a, b: ops.grouped_swiglu_fp8_training(x, c + 1, a, b), "counts_E sums to"),
        (
            lambda x, c, a, b: ops.grouped_swiglu_fp8_training(x, c, a, b, rows_N=torch.ones(5)),
            "rows_N must be an integer",
        ),
        (lambda x, c, a, b: ops.grouped_swiglu_fp8_training(x, c, b, b), "w_gate_up_E2FD must be"),
        (lambda x, c, a, b: ops.grouped_swiglu_fp8_training(x, c, a, b, scale_fmt="e5m2"), "scale_fmt"),
        (
            lambda x, c, a, b: ops.grouped_swiglu_fp8_training(x, c, a, b, torch.ones(3)),
            "row_weights_N must have one weight per row",
        ),
    ],
)
def test_fp8_experts_bad_inputs(call, message: str) -> None:
    x, counts = torch.randn(4, 128), torch.tensor([1, 3])
    w_gate_up, w_down = _experts(2, 128, 32)
    with pytest.raises(KernelInputError, match=message):
        call(x, counts, w_gate_up, w_down)


# ---- GPU: the benchmark's layer ------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp8_experts_gpu_deepseek_layer(rel_err) -> None:
    """64 experts, top-6, hidden 2048, width 1408, 4096 tokens: compiled kernels against the torch steps
    (same quantizations; the FP8 MMA's ~14-bit accumulation flips rare roundings) and fp32 autograd."""
    num_tokens, top_k, num_experts, hidden, width = 4096, 6, 64, 2048, 1408
    ids = torch.rand(num_tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    counts[:2] = 0  # empty experts at real size too
    n = int(counts.sum())
    x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    w_gate_up = (torch.randn(num_experts, 2 * width, hidden, device="cuda") / hidden**0.5).bfloat16()
    w_down = (torch.randn(num_experts, hidden, width, device="cuda") / width**0.5).bfloat16()
    weights, probe = torch.rand(n, device="cuda") + 0.5, torch.randn(n, hidden, device="cuda").bfloat16()
    with ops.force_backend("triton"):
        got = _fp8_grads(x, counts, w_gate_up, w_down, weights, probe)
    with ops.force_backend("torch"):
        expected = _fp8_grads(x, counts, w_gate_up, w_down, weights, probe)
    for name, a, b in zip(("out", "dx", "dw_gate_up", "dw_down", "drow_weights"), got, expected, strict=True):
        print(f"fp8 experts {name}: triton vs torch steps {rel_err(a, b):.2e}")
        assert rel_err(a, b) < 2e-2, name
    assert not got[2][:2].any() and not got[3][:2].any()
    exact = _fp8_grads(x.float(), counts, w_gate_up.float(), w_down.float(), weights, probe.float())
    leaves = [t.float().clone().requires_grad_(True) for t in (x, w_gate_up, w_down, weights)]
    out = reference.grouped_swiglu(leaves[0], counts.cpu(), *leaves[1:])
    (out * probe.float()).sum().backward()
    names = ("out", "dx", "dw_gate_up", "dw_down", "drow_weights")
    for name, a, b in zip(names, exact, [out, *(t.grad for t in leaves)], strict=True):
        print(f"fp8 experts {name}: vs fp32 autograd {rel_err(a, b.detach()):.2e}")
        assert rel_err(a, b.detach()) < 0.1, name
