"""Checkpoint test fixtures: a real redis-server and the real checkpoint service, on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2
from dsv3.serving.ports import free_port


class RedisServer:
    """A throwaway redis-server without persistence (a restart comes back empty)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._start()

    def _start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it with apt-get)")
        workdir = self.workdir
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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
        self.process.wait(timeout=10)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def restart_empty(self) -> None:
        """Kill it and start a new, empty redis-server on the same port (what a pod restart does)."""
        self.kill()
        self._start()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)  # hung: connections are accepted, nothing answers

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


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

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

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


class RawClient:
    """Speaks the generated protobuf stubs directly: any header field, any chunk, unary bytes."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = checkpoint_pb2_grpc.CheckpointServiceStub(self.channel)

    @staticmethod
    def requests(
        header: checkpoint_pb2.SaveHeader, tensors: dict[str, bytes], chunk: int = 64 << 10
    ) -> Iterator[checkpoint_pb2.SaveRequest]:
        yield checkpoint_pb2.SaveRequest(header=header)
        for index, data in enumerate(tensors.values()):
            crc = 0
            for offset in range(0, len(data), chunk):
                piece = data[offset : offset + chunk]
                crc = zlib.crc32(piece, crc)
                yield checkpoint_pb2.SaveRequest(
                    chunk=checkpoint_pb2.SaveChunk(tensor_index=index, offset=offset, data=piece, crc32=crc)
                )

    @staticmethod
    def header(job: str, step: int, tensors: dict[str, bytes], **fields) -> checkpoint_pb2.SaveHeader:
        specs = [
            tensor_pb2.TensorSpec(name=n, dtype=tensor_pb2.DType.UINT8, shape=[len(d)])
            for n, d in tensors.items()
        ]
        return checkpoint_pb2.SaveHeader(job=job, step=step, tensors=specs, **fields)

    def save(self, job: str, step: int, tensors: dict[str, bytes], timeout: float = 30, **fields):
        header = self.header(job, step, tensors, **fields)
        return self.stub.Save(self.requests(header, tensors), timeout=timeout)

    def load(self, job: str, step: int, timeout: float = 30) -> dict[str, bytes]:
        out: dict[str, bytearray] = {}
        name = None
        for message in self.stub.Load(checkpoint_pb2.LoadRequest(job=job, step=step), timeout=timeout):
            if message.WhichOneof("kind") == "tensor":
                name = message.tensor.name
                out[name] = bytearray()
            else:
                out[name] += message.data
        return {k: bytes(v) for k, v in out.items()}

    def unary(self, method: str, payload: bytes, timeout: float = 10) -> bytes:
        call = self.channel.unary_unary(
            f"/dsv3.rpc.v1.CheckpointService/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        return call(payload, timeout=timeout)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def raw_client() -> Iterator[Callable[[str], RawClient]]:
    """Factory of `RawClient`s for a server address; all are closed at teardown."""
    made: list[RawClient] = []

    def make(address: str) -> RawClient:
        made.append(RawClient(address))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def poll(poll_until: Callable[..., None]) -> Callable[..., None]:
    """`poll(condition, timeout, what)`: the suite's `poll_until`, with these tests' 10 s default and
    a 20 ms interval (races here resolve in milliseconds)."""

    def wait(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        poll_until(condition, timeout, what, interval=0.02)

    return wait
