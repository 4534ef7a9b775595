"""The checkpoint server installs and serves without torch: `pip install ./protos ./services/checkpoint`.

The dev venv holds every distribution, so only a fresh venv shows what `dsv3-checkpoint` really pulls
in. This builds one (no system site packages), installs dsv3-rpc and dsv3-checkpoint from copies of
their source trees (a real, non-editable install; the copies keep pip's in-tree build/ and egg-info
out of the checkout), and then runs that venv's console script. It fails if torch or the core `dsv3`
comes back into the server's dependencies, or if the server starts importing either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv3.serving.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = ("protos", "services/checkpoint")  # dsv3-rpc, dsv3-checkpoint: nothing else
PIP_TIMEOUT_S = 300  # wheels come from pip's cache after the first run


def _clean_env() -> dict[str, str]:
    """The environment minus what would let the dev venv's packages leak into the fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str | Path], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=_clean_env(), check=False
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with exactly `pip install ./protos ./services/checkpoint` in it."""
    work = tmp_path_factory.mktemp("torch-free")
    venv_dir = work / "venv"
    made = _run([sys.executable, "-m", "venv", venv_dir], timeout=120)
    assert made.returncode == 0, made.stderr
    sources = []
    for dist in DISTRIBUTIONS:
        copy = work / "src" / dist
        shutil.copytree(
            ROOT / dist, copy, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
        )
        sources.append(copy)
    python = venv_dir / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *sources]
    installed = _run(pip, timeout=PIP_TIMEOUT_S)
    assert installed.returncode == 0, f"pip install {' '.join(DISTRIBUTIONS)} failed:\n{installed.stderr}"
    return venv_dir


def test_the_install_has_neither_torch_nor_the_core(venv: Path) -> None:
    probe = (
        "import importlib.metadata as m, importlib.util as u, json\n"
        "print(json.dumps({'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()),"
        " 'codec': u.find_spec('dsv3.serving.tensor_codec') is not None}))\n"
    )
    result = _run([venv / "bin" / "python", "-c", probe], timeout=60)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert {"dsv3-rpc", "dsv3-checkpoint"} <= set(found["dists"])
    assert {"dsv3", "torch", "numpy"}.isdisjoint(found["dists"]), found["dists"]
    assert not found["codec"]  # the torch half of dsv3.serving belongs to the core
    imported = _run([venv / "bin" / "python", "-c", "import torch"], timeout=60)
    assert imported.returncode != 0 and "No module named 'torch'" in imported.stderr


def test_the_client_import_says_what_to_install(venv: Path) -> None:
    result = _run([venv / "bin" / "python", "-c", "from dsv3.checkpoint import CheckpointClient"], timeout=60)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr and "dsv3-checkpoint[client]" in result.stderr


@pytest.fixture
def server(venv: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """That venv's `dsv3-checkpoint` on a free port; killed at teardown if a test left it running."""
    port = free_port()
    log = tmp_path / "server.log"
    args = [venv / "bin" / "dsv3-checkpoint", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--data-dir", tmp_path / "data", "--min-free-bytes", "0"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, env=_clean_env()
        )
    try:
        yield process, f"127.0.0.1:{port}", log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status


def test_the_installed_server_serves_and_stops_on_sigterm(server) -> None:
    process, address, log = server
    deadline = time.monotonic() + 30
    status = None
    while status != health_pb2.HealthCheckResponse.SERVING:
        assert process.poll() is None, f"dsv3-checkpoint exited with {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not SERVING after 30 s:\n{log.read_text()}"
        with contextlib.suppress(grpc.RpcError):
            status = _health(address)
        time.sleep(0.05)
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert "libtorch" not in maps
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0, log.read_text()
