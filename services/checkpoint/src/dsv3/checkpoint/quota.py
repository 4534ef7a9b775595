"""Disk space accounting for saves: every stream reserves what it will write before it writes it.

Why: checking the quota against what is on disk when a stream opens lets any number of concurrent
streams pass the same check. Here the check and the reservation are one step under one lock, and a
reservation lasts until the stream's bytes are on disk in their final place (then they are counted
by the scan) or the stream failed. The free-space floor is kept the same way.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path


class StorageFull(Exception):
    """Saving would exceed the quota or the free disk space (RESOURCE_EXHAUSTED)."""


def save_footprint(data_bytes: int, header_bytes: int) -> int:
    """Bytes a stream adds to the data volume: its file, its record, its share of manifest.json.

    The record and the manifest repeat the header's tensor table with a few more numbers per tensor.
    """
    return data_bytes + 3 * header_bytes + 2048


class Reservation:
    def __init__(self, ledger: SpaceLedger, nbytes: int) -> None:
        self._ledger = ledger
        self.nbytes = nbytes

    def release(self) -> None:
        """Idempotent; call once the bytes are counted on disk (or will never be written)."""
        if self.nbytes:
            self._ledger._release(self.nbytes)
            self.nbytes = 0


class SpaceLedger:
    def __init__(
        self, data_dir: Path, quota_bytes: int, min_free_bytes: int, used_bytes: Callable[[], int]
    ) -> None:
        self.data_dir = data_dir
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self._used_bytes = used_bytes
        self._lock = threading.Lock()
        self.reserved = 0

    def reserve(self, nbytes: int) -> Reservation:
        """Reserve `nbytes` or raise StorageFull; blocking (scans the data directory under a quota)."""
        with self._lock:
            if self.quota_bytes:
                used = self._used_bytes() + self.reserved
                if used + nbytes > self.quota_bytes:
                    raise StorageFull(
                        f"saving {nbytes} bytes would exceed the quota of {self.quota_bytes} bytes "
                        f"({used} in use or reserved by saves in flight)"
                    )
            free = shutil.disk_usage(self.data_dir).free - self.reserved
            if free - nbytes < self.min_free_bytes:
                raise StorageFull(
                    f"saving {nbytes} bytes would leave {free - nbytes} bytes free on the data volume "
                    f"(minimum {self.min_free_bytes})"
                )
            self.reserved += nbytes
        return Reservation(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.reserved -= nbytes
