"""Read the trainer's progress from rank 0's `TrainerService.Status` RPC (trainer.proto).

The call itself is `status_rpc.call_status` (stubs imported lazily: an older dsv3-rpc without
trainer.proto gives None). Without an answer `read_trainer_status` returns None and the job's status
keeps what the pods say; loss and tokens/s are None until a step has run, the checkpoint step until one
is committed, the last anomaly until the trainer has seen one.
"""

from __future__ import annotations

import dataclasses
import math

from dsv3.operator.status_rpc import call_status


@dataclasses.dataclass(frozen=True)
class TrainerAnomaly:
    """The trainer's last anomaly (trainer.proto `TrainerAnomaly`): kind, step, what its policy did."""

    kind: str
    step: int
    action: str
    message: str

    @property
    def reason(self) -> str:
        """The kind as a condition reason: LOSS_SPIKE -> LossSpike."""
        return "".join(part.capitalize() for part in self.kind.split("_")) or "Anomaly"


@dataclasses.dataclass(frozen=True)
class TrainerStatus:
    state: str
    step: int
    total: int
    loss: float | None
    tokens_per_second: float | None
    last_checkpoint_step: int | None
    last_anomaly: TrainerAnomaly | None = None
    degraded: bool = False  # an anomaly within the trainer's --anomaly-clear-steps


def read_trainer_status(address: str, timeout: float = 2.0) -> TrainerStatus | None:
    """One Status call to `address` (host:port) with a deadline; None if unavailable for any reason."""
    reply = call_status("trainer", "TrainerService", "Status", "TrainerStatusRequest", address, timeout)
    if reply is None:
        return None
    return TrainerStatus(
        state=reply.state,
        step=reply.step,
        total=reply.total,
        # NaN/Inf (a diverged step under --anomaly-policy warn) is not JSON: the status would not patch.
        loss=reply.loss if reply.step > 0 and math.isfinite(reply.loss) else None,
        tokens_per_second=reply.tokens_per_second if reply.step > 0 else None,
        last_checkpoint_step=reply.last_checkpoint_step if reply.has_checkpoint else None,
        last_anomaly=_anomaly(reply),
        degraded=getattr(reply, "degraded", False),
    )


def _anomaly(reply) -> TrainerAnomaly | None:
    """None without one (or from a trainer whose trainer.proto predates anomalies)."""
    try:
        if not reply.HasField("last_anomaly"):
            return None
    except ValueError:
        return None
    a = reply.last_anomaly
    return TrainerAnomaly(a.kind, a.step, a.action, a.message)
