"""Shared test configuration: skip `gpu` tests without CUDA, seed every test, debug-model and kernel fixtures.

Without CUDA the Triton kernels run in Triton's CPU interpreter (small shapes). TRITON_INTERPRET must be in
the environment before the kernel modules (`dsv3.kernels.fp8`, `gemm`, `moe`) are imported: `@triton.jit`
picks the interpreter at decoration time. pytest imports this conftest before collecting any test, so
this holds for the whole suite and for any subset. With CUDA the same tests run the compiled kernels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("dsv3.kernels.fp8", "dsv3.kernels.gemm", "dsv3.kernels.moe", "dsv3.kernels.moe_train"):
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


# ---- service processes (expert shards, router): real servers on loopback ---------------------------
class ServiceProcess:
    """`python -m <module> --port P ...` as a subprocess; `start` waits until its health says SERVING."""

    def __init__(self, module: str, workdir: Path, *args: str, port: int | None = None) -> None:
        from dsv3.serving.ports import free_port

        self.module = module
        self.args = list(args)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = workdir / f"{module.rsplit('.', 1)[-1]}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 60.0) -> ServiceProcess:
        argv = [
            sys.executable,
            "-m",
            self.module,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        # Routers serve HTTP only where a test asks (--http-port: parallel runs would share the default
        # 8000), and speculate only where a test asks (--speculative on: the placement tests count the
        # main layers' slots; the MTP block's experts would take shard capacity too).
        env = {"DSV3_HTTP_PORT": "0", "DSV3_SPECULATIVE": "off", **os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_serving(timeout)
        return self

    def health(self) -> int:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            )

    def wait_serving(self, timeout: float = 60.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.process.returncode}: {self.log.read_text()}"
                )
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} not serving after {timeout}s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(timeout=10)
        return self.process.returncode if self.process else None


def _spawner(workdir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def make(module: str, *args: str, start: bool = True, port: int | None = None) -> ServiceProcess:
        proc = ServiceProcess(module, workdir, *args, port=port)
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """`spawn(module, *args, start=True)`: a service process, stopped at teardown."""
    yield from _spawner(tmp_path)


@pytest.fixture(scope="module")
def spawn_module(tmp_path_factory) -> Iterator[Callable[..., ServiceProcess]]:
    """`spawn` for processes shared by a whole test module."""
    yield from _spawner(tmp_path_factory.mktemp("procs"))


def wait_for(
    condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> None:
    """Poll `condition` every `interval` s until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def poll_until() -> Callable[..., None]:
    return wait_for


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free port."""
    import redis

    from dsv3.serving.ports import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_for(lambda: _pings(client), 10, "redis-server")
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
