"""A cap on concurrent transfer streams: a few run, some more wait, the rest are refused at once.

Why: each running Save stream holds its staging buffers and the chunks in flight (about 10 MiB), so
the server's memory is bounded only if the number of running streams is. A waiting stream has not
read a byte: gRPC flow control holds the client back, so waiting costs almost nothing, and a burst
of ranks all saving at once completes instead of failing. When the last stream ends the freed
buffers are handed back to the operating system (glibc keeps freed chunk buffers in its arenas).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)


class Busy(Exception):
    """Too many streams are running and waiting (maps to RESOURCE_EXHAUSTED)."""


def _malloc_trim() -> None:
    """Return free heap memory to the OS (glibc only; elsewhere nothing to do)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


class StreamGate:
    def __init__(self, kind: str, running: int, waiting: int, wait_seconds: float) -> None:
        self.kind = kind
        self.running = running
        self.waiting = waiting
        self.wait_seconds = wait_seconds
        self._slots = asyncio.Semaphore(running)
        self.active = 0
        self.queued = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Run the body in one of the `running` slots, waiting for one if fewer than `waiting` wait."""
        if self._slots.locked() and self.queued >= self.waiting:
            raise Busy(
                f"{self.active} {self.kind} streams running and {self.queued} waiting "
                f"(limits {self.running} and {self.waiting}); retry later"
            )
        self.queued += 1
        try:
            async with asyncio.timeout(self.wait_seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise Busy(f"no {self.kind} stream slot became free within {self.wait_seconds:g} s") from None
        finally:
            self.queued -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            if self.active == 0 and self.queued == 0:
                await asyncio.to_thread(_malloc_trim)
