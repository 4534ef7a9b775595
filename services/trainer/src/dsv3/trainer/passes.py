"""Concurrent forward/backward passes on the CPU: a micro-batch split over threads, one slice each.

Why: on a CPU a step of a small MoE is thousands of small ops. One OpenMP team over every core pays a
fork/join per op and leaves the other cores idle while Python dispatches the next op. N passes over N
slices of the micro-batch, each on its own thread with torch threads / N intra-op threads, keep the
cores busy instead: the kernels and the autograd engine release the GIL, so the passes overlap.

The sum of the passes' gradients must not depend on which thread finishes first, so that a run is
bitwise reproducible and a resumed run matches an uninterrupted one. Two passes onto empty gradients
accumulate straight into `.grad` from their threads (autograd's accumulation is locked; the first
gradient is taken as it is and the second added, and a + b == b + a exactly). Any other case (more
passes, or gradients already there from an earlier micro-batch, where (g + a) + b != (g + b) + a) takes
each pass's gradients from `torch.autograd.grad` and adds them into `.grad` in slice order. Either way
the result differs from one pass over the whole micro-batch only by the rounding of that sum, as
micro-batches do.

Passes run only where a rank's forward/backward holds no collective (expert parallel 1): the all-to-all
of two passes at once could not be matched across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch
from torch import nn

R = TypeVar("R")


def auto_passes(device: str, ep: int, sequences: int, threads: int) -> int:
    """The default: 2 on a CPU with at least 2 torch threads, when the micro-batch splits in two."""
    return 2 if device == "cpu" and ep == 1 and threads >= 2 and sequences % 2 == 0 else 1


class ConcurrentPasses:
    """Runs `passes` forward/backward passes at once; `passes == 1` runs the one pass inline."""

    def __init__(self, model: nn.Module, passes: int) -> None:
        if passes < 1:
            raise ValueError(f"ConcurrentPasses: passes must be >= 1, got {passes}")
        self.passes = passes
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._pool = None
        if passes > 1:
            # Each pass thread sets its own OpenMP thread count: a thread that never did starts from the
            # process default (one per core), and MKL's GEMMs follow that, not torch's global count. Without
            # it two passes run 2-thread GEMMs each on 2 cores (a 1024^3 GEMM in such a thread: 370 GFLOP/s
            # alone, i.e. both cores). On the benchmark the difference was within noise; it is the intent.
            share = max(1, torch.get_num_threads() // passes)
            self._pool = ThreadPoolExecutor(
                passes, thread_name_prefix="dsv3-pass", initializer=torch.set_num_threads, initargs=(share,)
            )

    def run(self, ids: torch.Tensor, loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, R]]) -> list[R]:
        """`loss_of(slice) -> (scaled loss, extra)` for each of `passes` slices of `ids` (split along the
        batch); the gradients of every loss are added into `.grad`; returns the extras in slice order."""
        if self._pool is None:
            loss, extra = loss_of(ids)
            loss.backward()
            return [extra]
        threads = torch.get_num_threads()
        # torch's own count (its elementwise kernels) is process-wide: every pass uses its share
        torch.set_num_threads(max(1, threads // self.passes))
        in_place = self.passes == 2 and all(p.grad is None for p in self.params)
        work = self._backward if in_place else self._gradients
        try:
            futures = [self._pool.submit(work, loss_of, part) for part in ids.chunk(self.passes)]
            wait(futures)  # all of them, even when one fails: none may still write `.grad` after we return
            results = [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)
        if not in_place:
            self._accumulate([grads for grads, _ in results])
        return [extra for _, extra in results]

    @staticmethod
    def _backward(loss_of, part: torch.Tensor) -> tuple:
        loss, extra = loss_of(part)
        loss.backward()
        return None, extra

    def _gradients(self, loss_of, part: torch.Tensor) -> tuple:
        loss, extra = loss_of(part)
        return torch.autograd.grad(loss, self.params, allow_unused=True), extra

    @torch.no_grad()
    def _accumulate(self, per_pass: list[tuple[torch.Tensor | None, ...]]) -> None:
        for i, param in enumerate(self.params):
            for grads in per_pass:  # slice order: the same sum whichever thread finished first
                grad = grads[i]
                if grad is None:
                    continue
                if param.grad is None:
                    same_layout = grad.stride() == param.stride()
                    param.grad = grad if same_layout else torch.empty_like(param).copy_(grad)
                else:
                    param.grad.add_(grad)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
