"""TEST HOOKS: faults injected into a run on purpose, so the anomaly handling can be tested by causing it.

Not a user feature. Read from the environment variable `DSV3_FAULT_INJECTION` (there is no flag for it,
so no settings file or chart can switch it on by accident), a comma-separated list of
`KIND@STEP[:key=value...]`:
- `nan@S`: the batch that step S of an uninterrupted run reads is poisoned: its loss (and so every
  gradient) becomes NaN. Keyed to the data, not the step counter: once a rollback skips that data, the
  poison is gone, as a bad batch in a real corpus would be.
- `spike@S:factor=F`: that batch's loss value is multiplied by F (default 20); its gradient is unchanged,
  so the spike test, not the gradient-norm test, has to see it.
- `sleep@S:seconds=X`: the rank sleeps X seconds (default 3600) before step S, so the run stalls.
Options of every kind: `rank=R` (only that rank; default every rank) and `attempt=A` (only in torchrun
restart A, default 0, so a restarted group runs clean; `attempt=any`: every time).
Example: `DSV3_FAULT_INJECTION="nan@7:rank=1,sleep@12:rank=0:seconds=30"`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from dsv3.model.loss import LossParts

ENV = "DSV3_FAULT_INJECTION"
KINDS = ("nan", "spike", "sleep")
log = logging.getLogger("dsv3.trainer")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    attempt: int | None = 0  # None: every attempt
    value: float = 0.0  # spike factor or sleep seconds


def parse_faults(text: str) -> list[Fault]:
    """`KIND@STEP[:key=value...]`, comma-separated; errors name the variable and the bad entry."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            head, *options = entry.split(":")
            kind, step = head.split("@")
            values = dict(option.split("=", 1) for option in options)
            if kind not in KINDS or int(step) < 1:
                raise ValueError(f"kind must be one of {'|'.join(KINDS)} and the step >= 1")
            default = {"nan": 0.0, "spike": 20.0, "sleep": 3600.0}[kind]
            value = float(values.pop("factor" if kind == "spike" else "seconds", default))
            rank = int(values.pop("rank")) if "rank" in values else None
            attempt_text = values.pop("attempt", "0")
            attempt = None if attempt_text == "any" else int(attempt_text)
            if values:
                raise ValueError(f"unknown option {sorted(values)[0]!r}")
        except ValueError as exc:
            raise ValueError(f"{ENV}: bad entry {entry!r}: {exc}") from exc
        faults.append(Fault(kind, int(step), rank, attempt, value))
    return faults


class FaultInjector:
    """The faults meant for this rank and this torchrun attempt (none: every method is a no-op)."""

    def __init__(self, faults: list[Fault], rank: int, attempt: int, batch: int) -> None:
        self.batch = batch
        self.faults = [
            f
            for f in faults
            if (f.rank is None or f.rank == rank) and (f.attempt is None or f.attempt == attempt)
        ]
        if self.faults:
            log.warning("TEST HOOK: injecting faults on rank %d: %s", rank, self.faults)

    @classmethod
    def from_env(cls, rank: int, attempt: int, batch: int) -> FaultInjector:
        return cls(parse_faults(os.environ.get(ENV, "")), rank, attempt, batch)

    def _at(self, kind: str, consumed: int) -> Fault | None:
        """The fault of `kind` on the batch starting at global sequence `consumed`."""
        return next(
            (f for f in self.faults if f.kind == kind and (f.step - 1) * self.batch == consumed), None
        )

    def before_step(self, step: int) -> None:
        for f in self.faults:
            if f.kind == "sleep" and f.step == step:
                log.warning("TEST HOOK: sleeping %.0f s before step %d", f.value, step)
                time.sleep(f.value)

    def poison(self, parts: LossParts, consumed: int) -> LossParts:
        """The loss of the batch at `consumed`, poisoned (nan) or spiked if a fault names it."""
        if (fault := self._at("nan", consumed)) is not None:
            nan = torch.tensor(float("nan"), device=parts.total.device)
            return dataclasses.replace(parts, total=parts.total * nan, main=parts.main * nan)
        if (fault := self._at("spike", consumed)) is not None:
            extra = (fault.value - 1) * parts.main.detach()  # the value spikes, the gradient does not
            return dataclasses.replace(parts, total=parts.total + extra, main=parts.main + extra)
        return parts
