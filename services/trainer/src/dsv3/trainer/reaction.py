"""What the trainer does about an anomaly (`anomaly_policy`), and where it says so.

- `warn`: report it and apply the update anyway;
- `skip`: report it and drop that step's update (weights, optimizer and routing biases stay as they were;
  the batch counts as consumed). An expert collapse lasts many steps, so skipping one update does not
  cure it: under `skip` it is only reported;
- `rollback`: report it, restore the last committed checkpoint, and continue from it with the data
  after the bad batch: the whole window from the checkpoint's data position through the bad batch is
  skipped (as large runs do after a loss spike). After `max_rollbacks` rollbacks the next anomaly fails
  the run (`AnomalyError`) with its reason.
Every anomaly is reported the moment it is decided: a structured log line (every rank), the step's
`metrics.jsonl` record (`anomalies`, `action`), and rank 0's status board (`last_anomaly`, `degraded`,
counters) that `TrainerService.Status` serves. The rollback and skip counters travel in checkpoint
metadata, so `max_rollbacks` bounds the run across restarts too.
"""

from __future__ import annotations

import dataclasses
import logging

from dsv3.trainer.anomaly import Action, Anomaly, AnomalyError, Health, Kind
from dsv3.trainer.metrics import MetricsLog
from dsv3.trainer.status import Board, State

log = logging.getLogger("dsv3.trainer")


@dataclasses.dataclass
class RunState:
    """Where the run is: the step done, the data position, and what the anomaly policy has done so far."""

    step: int = 0
    consumed: int = 0  # sequences of the global stream behind us (trained on or skipped)
    tokens: int = 0
    rollbacks: int = 0
    skipped: int = 0  # updates dropped by `skip`

    @classmethod
    def start(cls, resumed) -> RunState:
        if resumed is None:
            return cls()
        meta = resumed.metadata
        return cls(
            resumed.step,
            resumed.consumed,
            resumed.tokens,
            int(meta.get("rollbacks", 0)),
            int(meta.get("skipped_updates", 0)),
        )

    def advance(self, batch: int, tokens: int, skipped: bool) -> None:
        self.step += 1
        self.consumed += batch
        self.tokens += tokens
        self.skipped += int(skipped)

    def roll_back(self, checkpoint, skip_to: int) -> None:
        """Back to `checkpoint`'s weights and step, with the data position moved on to `skip_to`."""
        self.step, self.consumed, self.tokens = checkpoint.step, skip_to, checkpoint.tokens
        self.skipped = int(checkpoint.metadata.get("skipped_updates", 0))
        self.rollbacks += 1

    def metadata(self, loss: float | None) -> dict:
        return {"loss": loss, "rollbacks": self.rollbacks, "skipped_updates": self.skipped}


class Reaction:
    def __init__(
        self, config, rank: int, board: Board | None, metrics: MetricsLog | None, run: RunState
    ) -> None:
        self.config, self.rank, self.board, self.metrics, self.run = config, rank, board, metrics, run
        self.health = Health(config.anomaly_clear_steps)

    def decide(self, anomaly: Anomaly | None) -> str | None:
        """The policy's action for this step's (agreed) anomaly, reported; None for a clean step."""
        if anomaly is None:
            self.health.clean_step()
            return None
        policy = self.config.anomaly_policy
        if policy == "warn" or (policy == "skip" and anomaly.kind == Kind.EXPERT_COLLAPSE):
            action = Action.WARNED
        elif policy == "skip":
            action = Action.SKIPPED
        elif self.run.rollbacks >= self.config.max_rollbacks:
            action = Action.FAILED
        else:
            action = Action.ROLLED_BACK
        self.report(anomaly.with_action(action))
        if action == Action.FAILED:
            raise AnomalyError(
                f"{anomaly.kind} at step {anomaly.step} after {self.run.rollbacks} rollbacks "
                f"(max_rollbacks {self.config.max_rollbacks}): {anomaly.message}"
            )
        return action

    def report(self, anomaly: Anomaly) -> None:
        self.health.record(anomaly)
        log.warning(
            "anomaly step=%d kind=%s kinds=%s action=%s policy=%s rank=%d: %s",
            anomaly.step,
            anomaly.kind,
            ",".join(anomaly.kinds),
            anomaly.action,
            self.config.anomaly_policy,
            self.rank,
            anomaly.message,
        )
        if self.board is not None:
            self.board.update(
                last_anomaly=anomaly,
                anomalies=self.health.count,
                degraded=True,
                skipped_steps=self.run.skipped + (anomaly.action == Action.SKIPPED),
            )

    def fields(self, anomaly: Anomaly | None, action: str | None) -> dict:
        """The anomaly fields of a step's metrics record (present on every record)."""
        return {"anomalies": list(anomaly.kinds) if anomaly else [], "action": action}

    def rolled_back(self, anomaly: Anomaly, checkpoint, skip_to: int) -> None:
        first = checkpoint.consumed
        log.warning(
            "rollback %d/%d: restored checkpoint step %d after %s at step %d; skipping sequences [%d, %d)",
            self.run.rollbacks,
            self.config.max_rollbacks,
            checkpoint.step,
            anomaly.kind,
            anomaly.step,
            first,
            skip_to,
        )
        if self.board is not None:
            self.board.update(step=checkpoint.step, rollbacks=self.run.rollbacks)

    def stalled(self, idle: float) -> None:
        """The watchdog's report (its thread): the step in progress has not completed for `idle` s."""
        step = self.run.step + 1
        anomaly = Anomaly(
            Kind.STALL,
            (Kind.STALL,),
            step,
            f"no step completed for {idle:.1f} s (stall_timeout {self.config.stall_timeout:g} s); "
            f"last completed step {self.run.step}; exiting to be restarted from the last checkpoint",
            Action.EXITED,
        )
        self.report(anomaly)
        if self.metrics is not None:
            self.metrics.write(
                {"step": step, "anomalies": [Kind.STALL], "action": Action.EXITED, "message": anomaly.message}
            )
        if self.board is not None:
            self.board.update(state=State.TRAINER_STATE_FAILED, message=anomaly.message[:500])
