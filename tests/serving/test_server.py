"""The shared gRPC bootstrap in-process: health transitions and flags with environment twins."""

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv3.serving.flags import parse_config
from dsv3.serving.server import ServiceServer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return response.status


def test_health_follows_readiness_and_draining() -> None:
    async def scenario() -> list[int]:
        server = ServiceServer(["dsv3.Example"], [], "127.0.0.1", 0)
        await server.start()
        seen = [await _status(server.port), await _status(server.port, "dsv3.Example")]
        await server.set_serving(True)
        seen.append(await _status(server.port, "dsv3.Example"))
        runner = asyncio.create_task(server.run_until_stopped(grace_seconds=0.5))
        server.request_stop()
        await asyncio.sleep(0.05)
        await runner
        return seen

    assert asyncio.run(scenario()) == [NOT_SERVING, NOT_SERVING, SERVING]


@dataclasses.dataclass(frozen=True)
class _Example:
    data_dir: Path
    port: int = 5000
    redis_url: str | None = None
    verbose: bool = False


def test_flags_and_environment_twins(monkeypatch) -> None:
    monkeypatch.setenv("DSV3_PORT", "7000")
    monkeypatch.setenv("DSV3_VERBOSE", "true")
    config = parse_config(_Example, ["--data-dir", "/d"])
    assert config == _Example(Path("/d"), 7000, None, True)
    assert parse_config(_Example, ["--data-dir", "/d", "--port", "1"]).port == 1  # flag beats env
    monkeypatch.setenv("DSV3_DATA_DIR", "/from-env")
    assert parse_config(_Example, []).data_dir == Path("/from-env")


def test_missing_or_bad_flags_name_the_field(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_config(_Example, [])
    assert "--data-dir" in capsys.readouterr().err
    monkeypatch.setenv("DSV3_PORT", "many")
    with pytest.raises(SystemExit):
        parse_config(_Example, ["--data-dir", "/d"])
    assert "DSV3_PORT" in capsys.readouterr().err
