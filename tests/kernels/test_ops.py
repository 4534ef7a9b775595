"""dsv3.kernels.ops: input validation, the backend switch, dispatch, and import hygiene."""

import subprocess
import sys

import pytest
import torch

from dsv3.kernels import ops, reference
from dsv3.kernels.ops import KernelInputError

FP8 = torch.float8_e4m3fn


def _fp8(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(FP8)


def _offsets(*counts: int) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


A, A_S = _fp8(8, 256), torch.ones(8, 2)
B, B_S = _fp8(64, 256), torch.ones(1, 2)

BAD_CALLS = {
    "act_quant: x dtype": (
        lambda: ops.act_quant(torch.ones(4, 128, dtype=torch.int32)),
        "act_quant: x must be",
    ),
    "act_quant: non-contiguous": (lambda: ops.act_quant(torch.ones(128, 4).T), "x must be contiguous"),
    "act_quant: block_size": (lambda: ops.act_quant(torch.ones(4, 128), block_size=100), "block_size"),
    "act_quant: scale_fmt": (lambda: ops.act_quant(torch.ones(4, 128), scale_fmt="e8m0"), "scale_fmt"),
    "act_quant: scalar": (lambda: ops.act_quant(torch.tensor(1.0)), "at least 1 dims"),
    "weight_quant: 1-D": (lambda: ops.weight_quant(torch.ones(128)), "weight_quant: w must have at least 2"),
    "weight_dequant: w dtype": (
        lambda: ops.weight_dequant(torch.ones(4, 4), torch.ones(1, 1)),
        "w must be float8",
    ),
    "weight_dequant: s shape": (
        lambda: ops.weight_dequant(_fp8(200, 4), torch.ones(1, 1)),
        r"s must have shape \(2, 1\)",
    ),
    "weight_dequant: s dtype": (
        lambda: ops.weight_dequant(_fp8(4, 4), torch.ones(1, 1).bfloat16()),
        "s must be float32",
    ),
    "fp8_gemm: a dtype": (lambda: ops.fp8_gemm(A.float(), A_S, B, B_S), "fp8_gemm: a must be float8_e4m3fn"),
    "fp8_gemm: b 3-D": (lambda: ops.fp8_gemm(A, A_S, B[None], B_S), "b must be 2-D"),
    "fp8_gemm: K mismatch": (lambda: ops.fp8_gemm(A, A_S, _fp8(64, 128), B_S), "b must be"),
    "fp8_gemm: a_s shape": (
        lambda: ops.fp8_gemm(A, torch.ones(8, 1), B, B_S),
        r"a_s must have shape \(8, 2\)",
    ),
    "fp8_gemm: b_s shape": (lambda: ops.fp8_gemm(A, A_S, B, torch.ones(2, 2)), "b_s must be"),
    "fp8_gemm: a_s dtype": (lambda: ops.fp8_gemm(A, A_S.double(), B, B_S), "a_s must be float32"),
    "fp8_gemm: a not contiguous": (lambda: ops.fp8_gemm(_fp8(256, 8).T, A_S, B, B_S), "a must be contiguous"),
    "fp8_gemm: devices": (lambda: ops.fp8_gemm(A, A_S, B, B_S.to("meta")), "different devices"),
    "fp8_gemm: out_dtype": (lambda: ops.fp8_gemm(A, A_S, B, B_S, out_dtype=torch.int32), "out_dtype"),
    "grouped_gemm: offsets dtype": (
        lambda: ops.grouped_gemm(torch.ones(3, 16), torch.ones(2, 8, 16), torch.tensor([1, 3])),
        "offsets_E must be int32",
    ),
    "grouped_gemm: offsets length": (
        lambda: ops.grouped_gemm(torch.ones(3, 16), torch.ones(2, 8, 16), _offsets(3)),
        "one entry per expert",
    ),
    "grouped_gemm: offsets total": (
        lambda: ops.grouped_gemm(torch.ones(3, 16), torch.ones(2, 8, 16), _offsets(1, 1)),
        "ends at 2 but x has 3 rows",
    ),
    "grouped_gemm: offsets decreasing": (
        lambda: ops.grouped_gemm(
            torch.ones(3, 16), torch.ones(2, 8, 16), torch.tensor([4, 3], dtype=torch.int32)
        ),
        "non-decreasing",
    ),
    "grouped_gemm: w dtype": (
        lambda: ops.grouped_gemm(torch.ones(3, 16), torch.ones(2, 8, 16).bfloat16(), _offsets(1, 2)),
        "w_EOI must be float32",
    ),
    "grouped_gemm: w K": (
        lambda: ops.grouped_gemm(torch.ones(3, 16), torch.ones(2, 8, 32), _offsets(1, 2)),
        r"w_EOI must be \[E, O, I=16\]",
    ),
    "grouped_gemm_fp8: w_s shape": (
        lambda: ops.grouped_gemm_fp8(
            _fp8(3, 256), torch.ones(3, 2), _fp8(2, 8, 256), torch.ones(2, 1, 1), _offsets(1, 2)
        ),
        r"w_s must have shape \(2, 1, 2\)",
    ),
    "grouped_swiglu: counts total": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 16), torch.tensor([1, 1]), torch.ones(2, 8, 16), torch.ones(2, 16, 4)
        ),
        r"counts_E sums to 2 but x has 3 rows",
    ),
    "grouped_swiglu: counts negative": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 16), torch.tensor([4, -1]), torch.ones(2, 8, 16), torch.ones(2, 16, 4)
        ),
        r"non-negative",
    ),
    "grouped_swiglu: counts float": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 16), torch.ones(2), torch.ones(2, 8, 16), torch.ones(2, 16, 4)
        ),
        r"counts_E must be an integer tensor",
    ),
    "grouped_swiglu: counts length": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 16), torch.tensor([3]), torch.ones(2, 8, 16), torch.ones(2, 16, 4)
        ),
        r"one entry per expert \(2\)",
    ),
    "grouped_swiglu: w_down shape": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 16), torch.tensor([1, 2]), torch.ones(2, 8, 16), torch.ones(2, 16, 5)
        ),
        r"w_down_EDF must be \[E, D, F\]",
    ),
    "grouped_swiglu: hidden": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 12), torch.tensor([1, 2]), torch.ones(2, 8, 16), torch.ones(2, 16, 4)
        ),
        r"w_gate_up_E2FD must be \[E, 2F, D=12\]",
    ),
    "grouped_swiglu: row weights length": (
        lambda: ops.grouped_swiglu(
            torch.ones(3, 16), torch.tensor([1, 2]), torch.ones(2, 8, 16), torch.ones(2, 16, 4), torch.ones(2)
        ),
        r"row_weights_N must have one weight per row \(3\), got 2",
    ),
    "grouped_swiglu_fp8: scale shape": (
        lambda: ops.grouped_swiglu_fp8(
            torch.ones(3, 256),
            torch.tensor([3, 0, 0, 0]),
            _fp8(4, 128, 256),
            torch.ones(4, 1, 1),
            _fp8(4, 256, 64),
            torch.ones(4, 2, 1),
        ),
        r"s_gate_up must have shape \(4, 1, 2\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_kernel_input_error(name: str, backend: str) -> None:
    call, match = BAD_CALLS[name]
    with ops.force_backend(backend), pytest.raises(KernelInputError, match=match):
        call()


def test_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    assert ops.backend() == "auto"
    monkeypatch.setenv(ops.BACKEND_ENV, "Torch")
    assert ops.backend() == "torch"
    with ops.force_backend("triton"):
        assert ops.backend() == "triton"
        with ops.force_backend("auto"):
            assert ops.backend() == "auto"
        assert ops.backend() == "triton"
    assert ops.backend() == "torch"
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="DSV3_KERNELS"):
        ops.backend()
    with pytest.raises(ValueError, match="force_backend"), ops.force_backend("fast"):
        pass


def _spy(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_dispatch_follows_backend(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    from dsv3.kernels import fp8, gemm

    quant_calls, gemm_calls = _spy(monkeypatch, fp8, "act_quant"), _spy(monkeypatch, gemm, "fp8_gemm")
    x = torch.randn(4, 256, device=device)
    with ops.force_backend("torch"):
        ops.act_quant(x)
    assert not quant_calls
    with ops.force_backend("triton"):
        a, a_s = ops.act_quant(x)
        ops.fp8_gemm(a, a_s, B.to(device), B_S.to(device))
    assert quant_calls and gemm_calls
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    ops.act_quant(x)
    assert len(quant_calls) == 2
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    ops.act_quant(x)  # auto: Triton only for CUDA tensors
    assert len(quant_calls) == (3 if device.type == "cuda" else 2)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.act_quant(torch.randn(4, 128))


def test_existing_ops_keep_working() -> None:
    x, w = torch.randn(3, 16), torch.randn(16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    with pytest.raises(KernelInputError, match="rms_norm"):
        ops.rms_norm(x, torch.randn(8), 1e-6)


def test_importing_ops_and_model_does_not_import_triton() -> None:
    code = "import sys, dsv3.kernels.ops, dsv3.model.fp8_linear, dsv3.model; print('triton' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
