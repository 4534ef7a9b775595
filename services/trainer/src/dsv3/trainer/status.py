"""`TrainerService.Status` on rank 0: the training loop writes a board, a gRPC server thread reads it.

The server is the shared `ServiceServer` (health, reflection) on its own asyncio loop in a daemon
thread, so a slow client never stalls a training step and the loop never blocks the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import TYPE_CHECKING

import grpc

from dsv3.rpc.v1 import trainer_pb2, trainer_pb2_grpc
from dsv3.serving.server import ServiceServer

if TYPE_CHECKING:
    from dsv3.trainer.anomaly import Anomaly

SERVICE_NAME = "dsv3.rpc.v1.TrainerService"


class State:
    """The values of `TrainerStatusResponse.state` (a string, so clients need no enum table)."""

    TRAINER_STATE_STARTING = "STARTING"
    TRAINER_STATE_RUNNING = "RUNNING"
    TRAINER_STATE_CHECKPOINTING = "CHECKPOINTING"
    TRAINER_STATE_EXPORTING = "EXPORTING"
    TRAINER_STATE_COMPLETED = "COMPLETED"
    TRAINER_STATE_FAILED = "FAILED"


@dataclasses.dataclass
class Board:
    """What rank 0 knows about the run; updated under a lock, read as one snapshot."""

    job: str
    total_steps: int
    world_size: int = 1
    expert_parallel: int = 1
    data_parallel: int = 1
    restarts: int = 0
    state: str = State.TRAINER_STATE_STARTING
    step: int = 0
    loss: float = 0.0
    tokens_per_second: float = 0.0
    last_checkpoint_step: int | None = None
    message: str = ""
    last_anomaly: Anomaly | None = None
    degraded: bool = False
    anomalies: int = 0
    rollbacks: int = 0
    skipped_steps: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def update(self, **fields: object) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, value)

    def snapshot(self) -> trainer_pb2.TrainerStatusResponse:
        with self._lock:
            return trainer_pb2.TrainerStatusResponse(
                state=self.state,
                step=self.step,
                total=self.total_steps,
                loss=self.loss,
                tokens_per_second=self.tokens_per_second,
                has_checkpoint=self.last_checkpoint_step is not None,
                last_checkpoint_step=self.last_checkpoint_step or 0,
                job=self.job,
                world_size=self.world_size,
                expert_parallel=self.expert_parallel,
                data_parallel=self.data_parallel,
                restarts=self.restarts,
                message=self.message,
                last_anomaly=_anomaly_message(self.last_anomaly),
                degraded=self.degraded,
                anomalies=self.anomalies,
                rollbacks=self.rollbacks,
                skipped_steps=self.skipped_steps,
            )


def _anomaly_message(anomaly: Anomaly | None) -> trainer_pb2.TrainerAnomaly | None:
    if anomaly is None:
        return None
    return trainer_pb2.TrainerAnomaly(
        kind=anomaly.kind,
        kinds=list(anomaly.kinds),
        step=anomaly.step,
        action=anomaly.action,
        message=anomaly.message[:500],
        unix_time=anomaly.unix_time,
    )


class _Servicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, board: Board) -> None:
        self.board = board

    async def Status(self, request, context: grpc.aio.ServicerContext):
        return self.board.snapshot()


DRAIN_SECONDS = 10.0  # as the other services' SIGTERM drain (ServiceServer.run_until_stopped)


class StatusServer:
    """Serves `board` on host:port from a daemon thread until `stop()`."""

    def __init__(self, board: Board, host: str, port: int) -> None:
        self.board, self.host, self.port = board, host, port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ServiceServer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trainer-status", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise OSError(f"status_port: cannot serve on {self.host}:{self.port}: {self._error}")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread just ends
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        servicer = _Servicer(self.board)
        self._server = ServiceServer(
            [SERVICE_NAME],
            [lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s)],
            self.host,
            self.port,
        )
        await self._server.start()
        await self._server.set_serving(True)
        self._ready.set()
        await self._server._stopping.wait()
        await self._server.set_serving(False)
        # In-flight calls get DRAIN_SECONDS to finish (stop returns as soon as they have): with 1 s, a
        # Status call on a starved CPU was cancelled mid-answer instead of completing.
        await self._server.server.stop(DRAIN_SECONDS)

    def stop(self) -> None:
        if self._loop is not None and self._server is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._server.request_stop)
            self._thread.join(DRAIN_SECONDS + 10)
