"""The gRPC server bootstrap every dsv3 service uses.

grpc.aio server + `grpc.health.v1` (NOT_SERVING until the service says it is ready, and again while
draining) + server reflection; SIGTERM/SIGINT drain and stop with a grace period; OpenTelemetry
(`telemetry.py`): a server span per call, continuing the caller's trace, when tracing is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dsv3.serving import telemetry

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]


def _short_name(service: str) -> str:
    """dsv3.rpc.v1.ExpertShardService -> expert-shard (the process's default telemetry name)."""
    name = service.rsplit(".", 1)[-1].removesuffix("Service")
    return "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")


class ServiceServer:
    """Owns one grpc.aio server and the health status of the services on it."""

    def __init__(
        self,
        service_names: Sequence[str],
        registrars: Sequence[Registrar],
        host: str,
        port: int,
        max_message_bytes: int = 16 << 20,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        """`options`: further gRPC channel arguments (e.g. HTTP/2 flow control) for this server."""
        channel_args = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            *options,
        ]
        telemetry.setup("dsv3-" + _short_name(service_names[0]) if service_names else "dsv3")
        self.server = grpc.aio.server(options=channel_args, interceptors=telemetry.server_interceptors())
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for register in registrars:
            register(self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self._stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self, grace_seconds: float = 10.0) -> None:
        """Serve until SIGTERM/SIGINT (or `request_stop`), then drain: NOT_SERVING, finish calls, stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stopping.wait()
        log.info("draining: health NOT_SERVING, finishing in-flight calls (grace %.1fs)", grace_seconds)
        await self.set_serving(False)
        await self.server.stop(grace_seconds)


async def serve(
    server: ServiceServer, ready: Callable[[], Awaitable[None]], grace_seconds: float = 10.0
) -> None:
    """Start listening, run `ready` (recovery, loading), flip health to SERVING, serve until told to stop."""
    await server.start()
    await ready()
    await server.set_serving(True)
    log.info("serving %s on port %d", ", ".join(server.service_names), server.port)
    await server.run_until_stopped(grace_seconds)
