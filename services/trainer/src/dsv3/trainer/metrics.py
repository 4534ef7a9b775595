"""Per-step metrics: `<output-dir>/metrics.jsonl` (rank 0), a progress bar on a TTY, log lines otherwise."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import IO

import torch

log = logging.getLogger("dsv3.trainer")


def max_violation(load_LE: torch.Tensor) -> list[float]:
    """MaxVio per gate: max load / mean load - 1 (0 is perfect balance), as the aux-loss-free paper."""
    load = load_LE.double()
    mean = load.mean(-1).clamp_min(1e-12)
    return (load.max(-1).values / mean - 1).tolist()


class MetricsLog:
    """Appends one JSON object per step; a resumed run continues the same file."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()  # the stall watchdog writes from its own thread

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Progress:
    """tqdm bar (loss, tokens/s, ETA) on an interactive terminal; `key=value` log lines otherwise."""

    def __init__(self, mode: str, total: int, start: int, log_interval: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.log_interval = mode, total, log_interval
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.started = time.monotonic()
        self.start_step = start

    def update(self, step: int, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        elif self.mode == "log" and (step % self.log_interval == 0 or step == self.total):
            done = step - self.start_step
            eta = (time.monotonic() - self.started) / max(done, 1) * (self.total - step)
            log.info(
                "step=%d/%d loss=%.4f mtp=%s balance=%s grad_norm=%.3f lr=%.3g tokens_per_s=%.0f "
                "max_vio=%.3f eta_s=%.0f",
                step,
                self.total,
                record["loss"],
                _fmt(record.get("mtp")),
                _fmt(record.get("balance")),
                record["grad_norm"],
                record["lr"],
                record["tokens_per_s"],
                max(record["max_vio"] or [0.0]),
                eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"
