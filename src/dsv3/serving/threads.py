"""One OpenMP team per process: torch's intra-op threads for the compute thread, one for the others.

With GNU OpenMP every OS thread that runs a parallel torch op gets its own team of
`torch.get_num_threads()` workers. A service that computes on one thread (the router's model thread,
a shard's compute thread) and also touches tensors on its event loop (encoding rows, gathering
replies) ends up with two live teams; once their threads outnumber the cores, libgomp stops spinning
and every parallel region pays a futex wake-up. Measured on the 2-core CI box: a batch-64 decode step
of the benchmark model took 13 ms on its own and 30 ms once the event loop thread had run one
parallel op. So the compute thread keeps the configured count and every other thread runs torch
single-threaded (its work is small: copies and bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_compute_threads: int | None = None


def compute_threads() -> int:
    """The intra-op thread count the compute thread uses: OMP_NUM_THREADS or torch's default,
    as read the first time this is called (before any thread lowered it)."""
    global _compute_threads
    if _compute_threads is None:
        _compute_threads = torch.get_num_threads()
    return _compute_threads


def use_for_compute() -> None:
    """Call on the thread that runs the model or the experts (e.g. as its executor's initializer)."""
    torch.set_num_threads(compute_threads())


def use_for_bookkeeping() -> None:
    """Call on an event loop or helper thread that only moves tensors: no OpenMP team of its own."""
    compute_threads()
    torch.set_num_threads(1)


def running_with(threads: int, fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` run with `threads` intra-op threads on the calling thread (0: the compute count)."""

    def run() -> T:
        torch.set_num_threads(threads or compute_threads())
        return fn()

    return run
