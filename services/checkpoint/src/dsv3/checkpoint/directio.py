"""File I/O that bypasses the page cache (O_DIRECT): double-buffered writes, ranged reads.

Why: a checkpoint is written once and read rarely, so caching it only costs memory. In Kubernetes the
page cache a pod dirties is charged to its memory limit, and on virtual machines fresh page-cache
pages are slow to fault in; O_DIRECT keeps the server's footprint at a few staging buffers whatever
the checkpoint size, and lets the disk work while the next chunk is received and verified.

O_DIRECT needs block-aligned memory, offsets and lengths: bytes are staged in page-aligned anonymous
mmaps, the last block is zero-padded and the file truncated to its true size. Filesystems without
O_DIRECT (tmpfs) get the same code over an ordinary descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

ALIGNMENT = 4096  # covers 512-byte and 4 KiB logical blocks
T = TypeVar("T")


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """Open with O_DIRECT when asked and supported; returns (fd, whether O_DIRECT is on)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


class DirectWriter:
    """Appends bytes to a new file; one background write runs while the other buffer fills.

    `close()` makes the file durable (fsync) at its exact length; `abort()` closes it without either.
    Errors of a background write (ENOSPC, EIO) surface from the next `write` or from `close`.
    """

    def __init__(
        self,
        path: Path,
        buffer_bytes: int = 8 << 20,
        direct: bool = True,
        executor: Executor | None = None,
    ) -> None:
        """`executor`: where background writes run (shared by many writers); default, a thread of its own."""
        if buffer_bytes <= 0 or buffer_bytes % ALIGNMENT:
            raise ValueError(f"buffer_bytes must be a positive multiple of {ALIGNMENT}")
        self.path = path
        self.fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct)
        self.size = 0
        self._buffers = [mmap.mmap(-1, buffer_bytes), mmap.mmap(-1, buffer_bytes)]
        self._active = 0
        self._filled = 0
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        self._in_flight: Future[None] | None = None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            buffer = self._buffers[self._active]
            take = min(len(view), len(buffer) - self._filled)
            buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == len(buffer):
                self._flush(len(buffer))

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def _flush(self, length: int) -> None:
        """Hand the active buffer's first `length` bytes (aligned) to the writer thread and swap."""
        self._wait()
        block = memoryview(self._buffers[self._active])[:length]
        self._in_flight = self._executor.submit(_write_all, self.fd, block)
        self._active ^= 1
        self._filled = 0

    def close(self) -> None:
        """Write the tail (zero-padded to a block), cut the file to its size, fsync, release."""
        try:
            if self._filled:
                tail = self._filled
                padded = -(-tail // ALIGNMENT) * ALIGNMENT if self.direct else tail
                self._buffers[self._active][tail:padded] = bytes(padded - tail)
                self._flush(padded)
            self._wait()
            if self.direct:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self._release()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._wait()
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(BaseException):
            self._wait()  # a write still in flight must not outlive the descriptor
        if self._own_executor:
            self._executor.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for buffer in self._buffers:
            # A failed write's traceback may still hold a view of the buffer; then the GC frees it.
            with contextlib.suppress(BufferError):
                buffer.close()


def read_range(
    path: Path,
    offset: int,
    nbytes: int,
    chunk_bytes: int,
    direct: bool = True,
    copy: Callable[[memoryview], T] = bytes,
) -> Iterator[T]:
    """Yield bytes [offset, offset + nbytes) of a file in pieces of at most `chunk_bytes`.

    Reads whole aligned blocks into one reused buffer, so loading a checkpoint neither fills the page
    cache nor allocates more than one chunk ahead. Each piece is `copy(view)` of that buffer: the view
    is only valid during the call, so `copy` must copy (it may frame or checksum the bytes too).
    """
    fd, direct = _open(path, os.O_RDONLY, direct)
    try:
        yield from read_fd_range(fd, direct, offset, nbytes, chunk_bytes, copy, label=path.name)
    finally:
        os.close(fd)


def open_for_reading(path: Path, direct: bool = True) -> tuple[int, bool]:
    """A read-only descriptor of `path` (O_DIRECT where supported) and whether O_DIRECT is on."""
    return _open(path, os.O_RDONLY, direct)


def read_fd_range(
    fd: int,
    direct: bool,
    offset: int,
    nbytes: int,
    chunk_bytes: int,
    copy: Callable[[memoryview], T] = bytes,
    label: str = "file",
) -> Iterator[T]:
    """`read_range` over a descriptor the caller owns (it keeps reading a file unlinked meanwhile)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    span = -(-chunk_bytes // ALIGNMENT) * ALIGNMENT + ALIGNMENT
    with mmap.mmap(-1, span) as buffer:
        view = memoryview(buffer)
        try:
            position, end = offset, offset + nbytes
            while position < end:
                start = position - position % ALIGNMENT if direct else position
                want = min(end - position, chunk_bytes)
                length = position + want - start
                if direct:
                    length = -(-length // ALIGNMENT) * ALIGNMENT
                got = os.preadv(fd, [view[:length]], start)
                skip = position - start
                available = min(got - skip, want)
                if available <= 0:
                    raise EOFError(f"{label}: ends at byte {start + got}, expected {end}")
                piece = view[skip : skip + available]
                try:
                    yield copy(piece)
                finally:
                    piece.release()
                position += available
        finally:
            view.release()
