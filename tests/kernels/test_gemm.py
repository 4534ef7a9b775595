"""Block-scaled FP8 GEMM: Triton kernel vs reference, cuBLAS dispatch policy, GPU accuracy at real sizes."""

import pytest
import torch

from dsv3.kernels import ops, reference, scaled_mm

FP8 = torch.float8_e4m3fn
SHAPES = [(1, 128, 128), (37, 200, 256), (130, 96, 384), (64, 256, 200), (5, 1, 130)]  # (M, N, K)


def _operands(m: int, n: int, k: int, tiled_randn, device, b_tiles: bool = False):
    a, a_s = reference.act_quant(tiled_randn(m, k, device=device))
    b32 = tiled_randn(n, k, device=device)
    b, b_s = reference.act_quant(b32) if b_tiles else reference.weight_quant(b32)
    return a, a_s, b, b_s


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b_tiles", [False, True], ids=["b128x128", "b1x128"])
def test_fp8_gemm_kernel_fp32_out(
    triton_backend, device, tiled_randn, rel_err, fp8_dot_tol, shape, b_tiles
) -> None:
    a, a_s, b, b_s = _operands(*shape, tiled_randn, device, b_tiles)
    c = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    expected = reference.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    assert c.shape == (shape[0], shape[1]) and c.dtype == torch.float32
    assert rel_err(c, expected) < fp8_dot_tol
    # every row and column individually (a wrong scale on one tile of a ragged edge shows here)
    scale = expected.abs().amax().clamp_min(1e-30)
    assert ((c - expected).abs() / scale).max() < fp8_dot_tol


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp8_gemm_kernel_low_precision_out(triton_backend, device, tiled_randn, out_dtype) -> None:
    a, a_s, b, b_s = _operands(
        70, 160, 256, lambda *s, device: tiled_randn(*s, spread=1.0, device=device), device
    )
    c = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=out_dtype)
    expected = reference.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    assert c.dtype == out_dtype
    torch.testing.assert_close(c.float(), expected, rtol=2**-7, atol=1e-3 * expected.abs().max().item())


def test_fp8_gemm_matches_unquantized_product_loosely(triton_backend, device, rel_err) -> None:
    x, w = torch.randn(64, 384, device=device), torch.randn(192, 384, device=device)
    a, a_s = ops.act_quant(x)
    b, b_s = ops.weight_quant(w)
    err = rel_err(ops.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32), x @ w.T)
    assert 1e-3 < err < 0.08  # quantized (not silently exact), within e4m3 rounding


def test_gemm_config_heuristic() -> None:
    from dsv3.kernels.gemm import gemm_config

    assert gemm_config(1, 7168).block_m == 16
    assert gemm_config(64, 7168).block_m == 64
    big = gemm_config(4096, 4096)
    assert (big.block_m, big.block_n, big.num_warps) == (128, 128, 8)
    decode = gemm_config(64, 4096, num_sms=132)  # 32 tiles of 128: narrower N tiles to fill the SMs
    assert decode.block_n < 128


# ---- dispatch policy (pure logic) ------------------------------------------------------------------------

H100 = (9, 0)


@pytest.mark.parametrize(
    ("m", "n", "k", "kwargs", "expected"),
    [
        (4096, 4096, 4096, {}, "scaled_mm"),
        (4096, 4096, 7168, {}, "scaled_mm"),
        (4096, 7168, 2048, {}, "scaled_mm"),
        (128, 7168, 2048, {}, "triton"),  # decode
        (64, 4096, 7168, {}, "triton"),
        (4096, 4000, 4096, {}, "triton"),  # N not a multiple of 128
        (4096, 4096, 4000, {}, "triton"),  # K not a multiple of 128
        (4100, 4096, 4096, {}, "triton"),  # M not a multiple of 16
        (4096, 4096, 4096, {"known_unsupported": True}, "triton"),
        (4096, 4096, 4096, {"has_scaled_mm": False}, "triton"),
        (4096, 4096, 4096, {"capability": (8, 0)}, "torch"),  # A100: no FP8 tensor cores
        (4096, 4096, 4096, {"capability": (8, 9)}, "triton"),  # Ada: FP8 in Triton, no cuBLAS blockwise
        (4096, 4096, 4096, {"has_triton": False}, "scaled_mm"),
        (64, 4096, 4096, {"has_triton": False}, "scaled_mm"),
        (64, 4000, 4096, {"has_triton": False}, "torch"),
        (4096, 4096, 4096, {"capability": None}, "torch"),
    ],
)
def test_fp8_gemm_backend_policy(m, n, k, kwargs, expected) -> None:
    args = {"capability": H100, "has_scaled_mm": True, "has_triton": True} | kwargs
    assert scaled_mm.fp8_gemm_backend(m, n, k, **args) == expected


@pytest.mark.skipif(scaled_mm.scaled_mm_api() != "v2", reason="needs torch.nn.functional.scaled_mm")
@pytest.mark.parametrize("b_tiles", [False, True])
def test_blockwise_scaled_mm_layout_passes_torch_checks(b_tiles: bool) -> None:
    """torch's meta kernel checks the blockwise scale layouts cuBLAS needs; ours must pass them."""
    m, n, k = 256, 384, 640  # K/128 = 5: the 128x128 scales need padding to 8
    a = torch.empty(m, k, dtype=FP8, device="meta")
    b = torch.empty(n, k, dtype=FP8, device="meta")
    a_s = torch.ones(m, k // 128, device="meta")
    b_s = torch.ones(n if b_tiles else n // 128, k // 128, device="meta")
    out = scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    # and the checks are real: row-major activation scales are refused
    import torch.nn.functional as F

    with pytest.raises(RuntimeError):
        F.scaled_mm(
            a,
            b.t(),
            a_s,
            F.ScalingType.BlockWise1x128,
            b_s.t() if b_tiles else b_s,
            F.ScalingType.BlockWise1x128 if b_tiles else F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        )


# ---- GPU: real sizes ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(4096, 4096, 4096), (4096, 4096, 7168), (4096, 7168, 2048), (64, 7168, 2048)]
)
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fp8_gemm_gpu_accuracy(rel_err, shape, backend) -> None:
    m, n, k = shape
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") / k**0.5
    with ops.force_backend(backend):
        a, a_s = ops.act_quant(x)
        b, b_s = ops.weight_quant(w)
        c32 = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
        c16 = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.bfloat16)
    exact = reference.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)  # fp32 matmul of dequantized operands
    assert torch.equal(a.view(torch.uint8), reference.act_quant(x)[0].view(torch.uint8))
    assert rel_err(c32, exact) <= 1e-3
    assert rel_err(c16, exact) <= 4e-3  # bf16 output rounding alone is ~1e-3
    vs_bf16 = rel_err(c16, x.bfloat16() @ w.bfloat16().T)
    print(f"fp8_gemm {shape} {backend}: vs dequantized fp32 {rel_err(c32, exact):.2e}, vs bf16 {vs_bf16:.2e}")
    assert vs_bf16 < 0.06


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or scaled_mm.scaled_mm_api() is None,
    reason="needs CUDA and torch scaled_mm",
)
def test_blockwise_scaled_mm_gpu_matches_reference(rel_err) -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("blockwise scaled_mm needs Hopper or newer")
    x, w = torch.randn(512, 640, device="cuda"), torch.randn(384, 640, device="cuda")
    a, a_s = reference.act_quant(x)
    for b, b_s in (reference.weight_quant(w), reference.act_quant(w)):
        out = scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s, torch.float32)
        assert rel_err(out, reference.fp8_gemm(a, a_s, b, b_s, torch.float32)) <= 1e-3


# ---- activation quantization fused into the GEMM (decode shapes) ----------------------------------------


@pytest.mark.parametrize(("m", "k", "scale_fmt"), [(1, 128, None), (37, 300, None), (16, 256, "ue8m0")])
def test_fp8_linear_fuses_act_quant(
    triton_backend, device, tiled_randn, rel_err, fp8_dot_tol, m, k, scale_fmt
):
    """One launch quantizing x's 1x128 tiles inside the GEMM equals act_quant followed by fp8_gemm."""
    x = tiled_randn(m, k, device=device)
    w_q, w_s = reference.weight_quant(torch.randn(200, k, device=device))
    out = ops.fp8_linear(x, w_q, w_s, out_dtype=torch.float32, scale_fmt=scale_fmt)
    x_q, x_s = reference.act_quant(x, scale_fmt=scale_fmt)
    expected = reference.fp8_gemm(x_q, x_s, w_q, w_s, torch.float32)
    assert out.shape == (m, 200)
    assert rel_err(out, expected) < fp8_dot_tol  # the fused quantization rounds like torch's e4m3 cast
    row_scale = expected.abs().amax(-1, keepdim=True)
    assert ((out - expected).abs() / row_scale).max() < 10 * fp8_dot_tol  # every row, not just on average
    assert ops.fp8_linear(x.bfloat16(), w_q, w_s).dtype == torch.bfloat16


def test_e4m3_rounding_emulation_matches_torch(triton_backend, device) -> None:
    """The fused quantization's rounding (emulated under the interpreter, the hardware cast on a GPU)
    against torch's e4m3 cast: every e4m3 value, every midpoint (ties to even), subnormals, random values."""
    from dsv3.kernels import gemm

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, torch.rand(4000) * 896 - 448, torch.randn(2000) * 2**-7]).clamp(-448, 448)
    x = values[: values.numel() // 128 * 128].view(-1, 128).clone()
    x[:, 0] = 448.0  # every tile's amax is 448: scale 1, the quantized values are the rounded inputs
    w_q = torch.eye(128).to(torch.float8_e4m3fn)  # identity weight: the GEMM returns the quantized x
    out = gemm.fp8_gemm(x.to(device), None, w_q.to(device), torch.ones(1, 1, device=device), torch.float32)
    assert torch.equal(out.cpu(), x.to(torch.float8_e4m3fn).float())
