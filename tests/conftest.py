"""Shared test configuration: skip `gpu` tests without CUDA, seed every test, debug-model and kernel fixtures.

Without CUDA the Triton kernels run in Triton's CPU interpreter (small shapes). TRITON_INTERPRET must be in
the environment before the kernel modules (`dsv3.kernels.fp8`, `gemm`, `moe`) are imported: `@triton.jit`
picks the interpreter at decoration time. pytest imports this conftest before collecting any test, so
this holds for the whole suite and for any subset. With CUDA the same tests run the compiled kernels.
"""

import os
import sys
from collections.abc import Callable, Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("dsv3.kernels.fp8", "dsv3.kernels.gemm", "dsv3.kernels.moe"):
        if _name in sys.modules:  # decorated before the variable was set: its kernels would need a GPU
            raise pytest.UsageError(f"{_name} was imported before tests/conftest.py ran")

from dsv3.kernels import ops  # after TRITON_INTERPRET is set
from dsv3.model import DeepSeekV3, ModelConfig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def debug_config() -> ModelConfig:
    return ModelConfig.flavour("debug")


@pytest.fixture
def debug_model(debug_config: ModelConfig) -> DeepSeekV3:
    """The CPU debug flavour in float32, in eval mode, seeded."""
    torch.manual_seed(0)
    return DeepSeekV3(debug_config).eval()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend() -> Iterator[None]:
    """Run the ops on their Triton kernels (interpreted on the CPU)."""
    with ops.force_backend("triton"):
        yield


@pytest.fixture
def fp8_dot_tol(device: torch.device) -> float:
    """Relative tolerance of an FP8 tensor-core product against the fp32 reference.

    The interpreter multiplies in fp32, so 1e-5. Hopper's FP8 MMA keeps only about 14 mantissa bits while
    it accumulates (DeepSeek-V3 report, section 3.3.2): the kernels promote to fp32 after every 128-wide
    K block, which leaves ~1e-4 (measured 1.2e-4 on an H100); a wrong tile scale is off by O(1).
    """
    return 1e-5 if device.type == "cpu" else 5e-4


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _tiled_randn(*shape: int, spread: float = 3.0, device: torch.device | str = "cpu") -> torch.Tensor:
    x = torch.randn(*shape)
    magnitude = 10 ** (torch.rand(*shape[:-1], -(-shape[-1] // 128)) * 2 * spread - spread)
    return (x * magnitude.repeat_interleave(128, -1)[..., : shape[-1]]).to(device)


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Frobenius-norm relative error, in float64."""
    return _rel_err


@pytest.fixture
def tiled_randn() -> Callable[..., torch.Tensor]:
    """Gaussian values whose 1x128 tiles of the last dim have magnitudes 10**U(-3, 3): a kernel applying the
    wrong tile's scale would be far off."""
    return _tiled_randn
