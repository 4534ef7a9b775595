"""Read the trainer's progress from rank 0's `TrainerService.Status` RPC (trainer.proto).

The one place that knows the trainer's stub: it is imported lazily, and without it (trainer.proto not
in this dsv3-rpc) or without an answer, `read_trainer_status` returns None and the job's status keeps
what the pods say.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class TrainerStatus:
    state: str
    step: int
    total: int
    loss: float | None
    tokens_per_second: float | None
    last_checkpoint_step: int | None


def read_trainer_status(address: str, timeout: float = 2.0) -> TrainerStatus | None:
    """One Status call to `address` (host:port) with a deadline; None if unavailable for any reason."""
    try:
        pb2 = importlib.import_module("dsv3.rpc.v1.trainer_pb2")
        pb2_grpc = importlib.import_module("dsv3.rpc.v1.trainer_pb2_grpc")
    except ImportError:
        return None
    import grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = pb2_grpc.TrainerServiceStub(channel).Status(pb2.StatusRequest(), timeout=timeout)
    except grpc.RpcError:
        return None
    last = getattr(reply, "last_checkpoint_step", None)
    return TrainerStatus(
        state=str(getattr(reply, "state", "")),
        step=int(getattr(reply, "step", 0)),
        total=int(getattr(reply, "total", 0)),
        loss=float(reply.loss) if hasattr(reply, "loss") else None,
        tokens_per_second=float(reply.tokens_per_second) if hasattr(reply, "tokens_per_second") else None,
        last_checkpoint_step=int(last) if last is not None else None,
    )
