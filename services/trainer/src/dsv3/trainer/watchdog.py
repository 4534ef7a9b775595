"""The stall watchdog: a thread outside the training loop that ends the process when no step completes.

A rank that hangs (a stuck collective, a dead NFS mount, a peer that sleeps) cannot notice it itself.
The loop calls `beat()` after every completed step and pauses the watchdog around work with its own
deadlines (checkpoint save and restore, evaluation). When `timeout` seconds pass without a beat, the
watchdog reports (log line, metrics, status, through `on_stall`), keeps the status server answering for
`report_seconds` so whoever polls it can read why, and then exits the process with `STALL_EXIT_CODE`:
torchrun (or the operator) restarts the group, which resumes from the last committed checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

# 128 + SIGALRM: "killed by an alarm" to tools reading exit codes, and retried by the operator's
# `restartPolicy: ExitCode` (codes 1-127 count as permanent there; a stall is not).
STALL_EXIT_CODE = 142
log = logging.getLogger("dsv3.trainer")


class StallWatchdog:
    def __init__(
        self,
        timeout: float,
        on_stall: Callable[[float], None],
        report_seconds: float = 3.0,
        exit_code: int = STALL_EXIT_CODE,
    ) -> None:
        self.timeout, self.on_stall = timeout, on_stall
        self.report_seconds, self.exit_code = report_seconds, exit_code
        self._last = time.monotonic()
        self._paused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)

    def start(self) -> StallWatchdog:
        if self.timeout > 0:
            self.beat()
            self._thread.start()
        return self

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work with deadlines of its own (checkpoint I/O, evaluation) does not count as a stall."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        interval = min(max(self.timeout / 20, 0.05), 1.0)
        while not self._stop.wait(interval):
            with self._lock:
                idle = 0.0 if self._paused else time.monotonic() - self._last
            if idle > self.timeout:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        try:
            self.on_stall(idle)
        except Exception:  # the exit below must happen whatever the report did
            log.exception("stall report failed")
        time.sleep(self.report_seconds)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code)
