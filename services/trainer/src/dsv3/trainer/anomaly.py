"""Anomaly detection at the step: what went wrong, agreed by every rank, and how long it counts.

Tested every step, on every rank, from values that are already global (the all-reduced loss, the global
gradient norm, MaxVio of the all-reduced loads), then agreed with one all-reduce of a few flags, so
every rank takes the same decision even if one saw something the others did not:
- NONFINITE: NaN or Inf in the loss or in any gradient (a non-finite element makes the global norm so);
- LOSS_SPIKE: the loss's robust z-score, (loss - median) / (1.4826 MAD), against the last `window`
  clean steps is above `spike_zscore` (upward only: a falling loss is never a spike). The scale has a
  floor of 0.1% of the median, so a window of near-identical losses does not make noise a spike;
- GRAD_NORM_EXPLOSION: the gradient norm above `grad_norm_factor` x the window's median norm;
- EXPERT_COLLAPSE: one MoE layer's MaxVio (max load / mean load - 1) above `collapse_max_vio` for
  `collapse_steps` consecutive steps.
The stall (no step completed for a while) is the watchdog's (`dsv3.trainer.watchdog`): a stalled loop
cannot test itself. Anomalous steps never enter the history, so one bad step does not raise the bar.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import time

import torch
import torch.distributed as dist


class Kind:
    """Anomaly kinds, most severe first (the first one found names an anomaly)."""

    NONFINITE = "NONFINITE"
    LOSS_SPIKE = "LOSS_SPIKE"
    GRAD_NORM_EXPLOSION = "GRAD_NORM_EXPLOSION"
    EXPERT_COLLAPSE = "EXPERT_COLLAPSE"
    STALL = "STALL"


STEP_KINDS = (Kind.NONFINITE, Kind.LOSS_SPIKE, Kind.GRAD_NORM_EXPLOSION, Kind.EXPERT_COLLAPSE)


class Action:
    """What the trainer did about an anomaly (`anomaly_policy`)."""

    WARNED = "WARNED"
    SKIPPED = "SKIPPED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"
    EXITED = "EXITED"


class AnomalyError(RuntimeError):
    """The run cannot go on (rollbacks exhausted); the message says what happened where."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    spike_zscore: float = 6.0  # 0: off
    window: int = 50
    warmup: int = 10
    grad_norm_factor: float = 10.0  # 0: off
    collapse_max_vio: float = 2.0  # 0: off
    collapse_steps: int = 50

    @classmethod
    def of(cls, config) -> Thresholds:
        """From a `TrainConfig` (validated there: every field named in its errors)."""
        return cls(
            config.spike_zscore,
            config.spike_window,
            config.spike_warmup,
            config.grad_norm_factor,
            config.collapse_max_vio,
            config.collapse_steps,
        )


@dataclasses.dataclass(frozen=True)
class Anomaly:
    kind: str  # the most severe of `kinds`
    kinds: tuple[str, ...]
    step: int
    message: str
    action: str = ""
    unix_time: float = dataclasses.field(default_factory=time.time)

    def with_action(self, action: str) -> Anomaly:
        return dataclasses.replace(self, action=action)


def robust_zscore(value: float, history: list[float]) -> float:
    """(value - median) / (1.4826 MAD), the scale floored at 0.1% of |median| (and 1e-12)."""
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    scale = max(1.4826 * mad, 1e-3 * abs(median), 1e-12)
    return (value - median) / scale


class AnomalyDetector:
    """Per-run state of the tests above; `check` once per step, `accept` the steps that were clean."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.t = thresholds
        self.losses: collections.deque[float] = collections.deque(maxlen=thresholds.window)
        self.norms: collections.deque[float] = collections.deque(maxlen=thresholds.window)
        self.collapsed_for: list[int] = []  # consecutive steps above the MaxVio threshold, per layer

    def check(self, step: int, loss: float, grad_norm: float, max_vio: list[float]) -> Anomaly | None:
        """This step's anomaly (None: clean). Updates the collapse counters, not the history."""
        found: dict[str, str] = {}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            found[Kind.NONFINITE] = f"loss {loss}, gradient norm {grad_norm}"
        warm = len(self.losses) >= max(self.t.warmup, 1)
        if Kind.NONFINITE not in found and warm and self.t.spike_zscore > 0:
            z = robust_zscore(loss, list(self.losses))
            if z > self.t.spike_zscore:
                found[Kind.LOSS_SPIKE] = (
                    f"loss {loss:.4g} has robust z-score {z:.1f} > {self.t.spike_zscore:g} against the "
                    f"median {statistics.median(self.losses):.4g} of the last {len(self.losses)} steps"
                )
        if Kind.NONFINITE not in found and warm and self.t.grad_norm_factor > 0:
            median = statistics.median(self.norms)
            if grad_norm > self.t.grad_norm_factor * median:
                found[Kind.GRAD_NORM_EXPLOSION] = (
                    f"gradient norm {grad_norm:.4g} > {self.t.grad_norm_factor:g} x the median "
                    f"{median:.4g} of the last {len(self.norms)} steps"
                )
        collapsed = self._collapse(max_vio)
        if collapsed:
            found[Kind.EXPERT_COLLAPSE] = collapsed
        if not found:
            return None
        kinds = tuple(k for k in STEP_KINDS if k in found)
        return Anomaly(kinds[0], kinds, step, "; ".join(found[k] for k in kinds))

    def _collapse(self, max_vio: list[float]) -> str:
        if self.t.collapse_max_vio <= 0:
            return ""
        if len(self.collapsed_for) != len(max_vio):
            self.collapsed_for = [0] * len(max_vio)
        worst = ""
        for layer, vio in enumerate(max_vio):
            self.collapsed_for[layer] = self.collapsed_for[layer] + 1 if vio > self.t.collapse_max_vio else 0
            if self.collapsed_for[layer] >= self.t.collapse_steps:
                worst = worst or (
                    f"gate {layer}: MaxVio {vio:.3g} > {self.t.collapse_max_vio:g} for "
                    f"{self.collapsed_for[layer]} consecutive steps"
                )
                self.collapsed_for[layer] = 0  # report again after another collapse_steps steps
        return worst

    def accept(self, loss: float, grad_norm: float) -> None:
        """A clean step's values join the sliding window."""
        self.losses.append(loss)
        self.norms.append(grad_norm)

    def reset_collapse(self) -> None:
        """After a rollback the weights and biases are those of the checkpoint: count afresh."""
        self.collapsed_for = [0] * len(self.collapsed_for)


def agree(anomaly: Anomaly | None, step: int, group: dist.ProcessGroup | None, device) -> Anomaly | None:
    """One all-reduce (MAX) of this rank's kind flags: every rank leaves with the same kinds."""
    if group is None:
        return anomaly
    mine = set(anomaly.kinds) if anomaly is not None else set()
    flags = torch.tensor([float(k in mine) for k in STEP_KINDS], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    kinds = tuple(k for k, f in zip(STEP_KINDS, flags.tolist(), strict=True) if f > 0)
    if not kinds:
        return None
    if anomaly is not None and set(kinds) == mine:
        return anomaly
    message = anomaly.message if anomaly is not None else "seen on another rank"
    return Anomaly(kinds[0], kinds, step, message)


class Health:
    """Degraded from an anomaly until `clear_steps` clean steps have followed it."""

    def __init__(self, clear_steps: int) -> None:
        self.clear_steps = clear_steps
        self.last: Anomaly | None = None
        self.count = 0
        self.clean_since = 0

    def record(self, anomaly: Anomaly) -> None:
        self.last, self.clean_since = anomaly, 0
        self.count += 1

    def clean_step(self) -> None:
        self.clean_since += 1

    @property
    def degraded(self) -> bool:
        return self.last is not None and self.clean_since < self.clear_steps
