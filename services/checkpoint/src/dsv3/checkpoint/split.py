"""Split a sequence of sized items into contiguous runs of about equal bytes.

Client and server share this so that a part saved over N streams and a checkpoint loaded over N
streams divide their tensors the same, deterministic way, keeping the stored order.
"""

from __future__ import annotations


def balanced_runs(sizes: list[int], runs: int) -> list[int]:
    """The run index (0..runs-1, non-decreasing) of each item; each item goes where its middle byte falls."""
    if runs <= 0:
        raise ValueError(f"runs must be >= 1, got {runs}")
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    index, before = [], 0
    for size in sizes:
        index.append(min(runs - 1, (2 * before + size) * runs // (2 * total)))
        before += size
    return index


def group(items: list, runs: list[int]) -> list[list]:
    """Items gathered per run, empty runs dropped, order kept."""
    groups: dict[int, list] = {}
    for item, run in zip(items, runs, strict=True):
        groups.setdefault(run, []).append(item)
    return [groups[r] for r in sorted(groups)]
