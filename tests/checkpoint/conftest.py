"""Checkpoint test fixtures: a real redis-server and the real checkpoint service, on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open

from dsv3.checkpoint import CheckpointClient
from dsv3.serving.ports import free_port


class RedisServer:
    """A throwaway redis-server without persistence (a restart comes back empty)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it with apt-get)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def flushall(self) -> None:
        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class CheckpointServer:
    """`python -m dsv3.checkpoint` as a subprocess; waits until its health check says SERVING."""

    def __init__(self, data_dir: Path, redis_url: str | None = None, *extra: str) -> None:
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.extra = list(extra)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = data_dir.parent / f"checkpoint-server-{self.port}.log"

    def start(self) -> CheckpointServer:
        args = [
            sys.executable,
            "-m",
            "dsv3.checkpoint",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--min-free-bytes",
            "0",
            *self.extra,
        ]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.wait_serving()
        return self

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"checkpoint server exited with {self.process.returncode}: {self.log.read_text()}"
                )
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"checkpoint server not serving after {timeout}s: {self.log.read_text()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            return self.process.wait(timeout=20)
        return self.process.returncode if self.process else 0


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(params=["embedded", "redis"])
def server(request, tmp_path) -> Iterator[CheckpointServer]:
    """A running checkpoint server, once with the embedded SQLite index and once with Redis."""
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_server").url
    srv = CheckpointServer(tmp_path / "data", redis_url).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: CheckpointServer) -> Iterator[CheckpointClient]:
    with CheckpointClient(server.address, chunk_bytes=64 << 10, retries=2, backoff_seconds=0.05) as c:
        yield c


@pytest.fixture
def make_server(tmp_path) -> Iterator[Callable[..., CheckpointServer]]:
    """Factory for extra servers (custom flags); all are stopped at teardown."""
    started: list[CheckpointServer] = []

    def make(
        redis_url: str | None = None, *extra: str, data_dir=None, start: bool = True
    ) -> CheckpointServer:
        srv = CheckpointServer(data_dir or tmp_path / f"data{len(started)}", redis_url, *extra)
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory) -> Iterator[CheckpointServer]:
    """One embedded-index server for a whole module of tests that use distinct job ids."""
    srv = CheckpointServer(tmp_path_factory.mktemp("shared") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def shared_client(shared_server: CheckpointServer) -> Iterator[CheckpointClient]:
    with CheckpointClient(shared_server.address, retries=1, backoff_seconds=0.05) as c:
        yield c


@pytest.fixture
def file_holding() -> Callable[[Path, str], Path]:
    """Finds the stored safetensors file (a part, or a segment of one) that holds a tensor."""

    def find(directory: Path, name: str) -> Path:
        for path in sorted(directory.glob("part-*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                if name in set(handle.keys()):
                    return path
        raise AssertionError(f"no stored file in {directory} holds {name}")

    return find
