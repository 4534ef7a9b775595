"""Per-(job, step) coordination: one lock per step, the newest attempt of each part, live writers.

Why: a part is published, a checkpoint committed, and pending parts expired by different threads;
each of those holds the step's lock, so a part can never change while a commit reads it, nor after.
Attempts let a zombie writer (a rank of an earlier restart that is still streaming) be refused as
soon as a newer attempt of its part has started, instead of racing it to the finish.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Superseded(Exception):
    """A newer attempt of this part exists (maps to ABORTED): the older writer must stop."""


StepId = tuple[str, int]


class StepRegistry:
    """Thread-safe; entries exist only while a step is locked, written, or has claimed attempts."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[StepId, tuple[threading.Lock, int]] = {}  # lock, holders + waiters
        self._attempts: dict[StepId, dict[int, int]] = {}  # part -> newest attempt seen
        self._writers: dict[StepId, int] = {}  # open Save streams per step

    @contextmanager
    def locked(self, job: str, step: int) -> Iterator[None]:
        """Hold the step's lock; the lock object is dropped when nobody holds or awaits it."""
        key = (job, step)
        with self._mutex:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def claim(self, job: str, step: int, part: int, attempt: int) -> None:
        """Register a writer of `part` with `attempt`; Superseded if a newer attempt was seen."""
        with self._mutex:
            self._check(job, step, part, attempt)
            parts = self._attempts.setdefault((job, step), {})
            parts[part] = max(parts.get(part, attempt), attempt)
            self._writers[(job, step)] = self._writers.get((job, step), 0) + 1

    def check(self, job: str, step: int, part: int, attempt: int) -> None:
        """Superseded if a newer attempt of `part` than `attempt` has been claimed."""
        with self._mutex:
            self._check(job, step, part, attempt)

    def _check(self, job: str, step: int, part: int, attempt: int) -> None:
        newest = self._attempts.get((job, step), {}).get(part, attempt)
        if attempt < newest:
            raise Superseded(
                f"{job}@{step} part {part}: attempt {attempt} was superseded by attempt {newest}"
            )

    def release(self, job: str, step: int) -> None:
        """A writer of the step ended (published, failed or cancelled)."""
        with self._mutex:
            left = self._writers.get((job, step), 1) - 1
            if left:
                self._writers[(job, step)] = left
            else:
                self._writers.pop((job, step), None)

    def writing(self, job: str, step: int) -> bool:
        with self._mutex:
            return (job, step) in self._writers

    def forget(self, job: str, step: int) -> None:
        """The step was committed or discarded: its attempts no longer matter."""
        with self._mutex:
            self._attempts.pop((job, step), None)
