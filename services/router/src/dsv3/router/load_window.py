"""The recent per-layer per-expert load the router has routed: what the placement planner follows.

The MoE layers' `RemoteDispatcher`s count rows per expert as they dispatch (cumulative, in the model
thread). `LoadWindow` samples those counters every `bucket_seconds` on the event loop and keeps the
samples of the last `window_seconds`; the window's load is the newest sample minus the oldest, so old
traffic ages out without the hot path doing more than its one addition per layer and step.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

import torch

from dsv3.router.remote import RemoteDispatcher


class LoadWindow:
    def __init__(
        self,
        dispatchers: Sequence[RemoteDispatcher],
        window_seconds: float,
        bucket_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0 or bucket_seconds <= 0:
            raise ValueError("window_seconds and bucket_seconds must be > 0")
        self.dispatchers = list(dispatchers)
        self.window = window_seconds
        self.bucket = bucket_seconds
        self.clock = clock
        self._samples: collections.deque[tuple[float, torch.Tensor]] = collections.deque()
        self.sample()

    def _totals_LE(self) -> torch.Tensor:
        return torch.stack([d.loads_E.clone() for d in self.dispatchers]).double()

    def sample(self) -> None:
        """Record the counters now; forget samples older than the window (keeping one at its edge)."""
        now = self.clock()
        self._samples.append((now, self._totals_LE()))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def load_LE(self) -> torch.Tensor:
        """Rows routed to each expert of each MoE layer within the window [L, E] (float64)."""
        self.sample()
        return self._samples[-1][1] - self._samples[0][1]

    def span_seconds(self) -> float:
        return self._samples[-1][0] - self._samples[0][0]


async def run_sampling(window: LoadWindow) -> None:
    """Sample the counters every bucket until cancelled (the router's background task)."""
    import asyncio

    while True:
        await asyncio.sleep(window.bucket)
        window.sample()
