"""glibc malloc settings for a training process: keep freed memory for the next step.

A training step allocates and frees the same few hundred activation and gradient buffers of 1-30 MB
every step. With glibc's defaults many of them are mmapped afresh or handed back to the OS when the
heap top is trimmed, so the next step page-faults them in again: about 12,000 minor faults (50 MB of
zeroed pages) per step of the benchmark model, 7% of its tokens/s (benchmarks/RESULTS.md). Raising the
mmap threshold to glibc's maximum and the trim threshold to 1 GiB makes the heap hold on to them, as a
caching allocator would. Explicit glibc settings in the environment are left to win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("dsv3.trainer")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; False where they do not apply (not glibc, or the
    environment sets malloc itself through MALLOC_*_ variables or GLIBC_TUNABLES)."""
    if any(name in os.environ for name in _USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no glibc mallopt
        return False
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied
    if not applied:
        log.warning("mallopt refused the mmap/trim thresholds; glibc's defaults stay")
    return applied
