"""O_DIRECT staging writer, ranged reader and the prefetching iterator behind the checkpoint service."""

import errno
import os
import threading
from pathlib import Path

import pytest

from dsv3.checkpoint.directio import ALIGNMENT, DirectWriter, read_range
from dsv3.checkpoint.prefetch import prefetched


def _pieces(payload: bytes, sizes: list[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        out.append(payload[at : at + size])
        at += size
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("total", [0, 1, ALIGNMENT - 1, ALIGNMENT, 3 * ALIGNMENT + 17, 70_001])
def test_writer_keeps_exact_bytes_and_size(tmp_path: Path, direct: bool, total: int) -> None:
    payload = os.urandom(total)
    sizes = [7, ALIGNMENT + 3, 2 * ALIGNMENT, 1, 10**6]
    path = tmp_path / "f.bin"
    writer = DirectWriter(path, buffer_bytes=2 * ALIGNMENT, direct=direct)  # tiny: many flushes
    for piece in _pieces(payload, sizes):
        writer.write(piece)
    assert writer.size == total
    writer.close()
    assert path.stat().st_size == total
    assert path.read_bytes() == payload


def test_writer_falls_back_where_o_direct_is_refused(tmp_path: Path, monkeypatch) -> None:
    # Filesystems without O_DIRECT answer EINVAL; recent kernels accept it even on tmpfs, so the refusal
    # is simulated here (the one stand-in in this file).
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    path = tmp_path / "f.bin"
    writer = DirectWriter(path, buffer_bytes=ALIGNMENT)
    assert writer.direct is False
    writer.write(b"abc" * 5000)
    writer.close()
    assert path.read_bytes() == b"abc" * 5000
    assert b"".join(read_range(path, 3, 9000, 4096)) == (b"abc" * 5000)[3:9003]


def test_writer_refuses_existing_file_and_bad_buffer(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"committed")
    with pytest.raises(FileExistsError):
        DirectWriter(path)
    assert path.read_bytes() == b"committed"
    with pytest.raises(ValueError, match="multiple"):
        DirectWriter(tmp_path / "g.bin", buffer_bytes=ALIGNMENT + 1)


def test_writer_surfaces_background_write_errors(tmp_path: Path) -> None:
    writer = DirectWriter(tmp_path / "f.bin", buffer_bytes=ALIGNMENT, direct=False)
    os.close(writer.fd)  # the next background write fails with EBADF
    writer.fd = os.open(os.devnull, os.O_RDONLY)
    writer.write(b"x" * ALIGNMENT)  # fills a buffer: the write goes to the thread
    with pytest.raises(OSError):
        writer.write(b"y" * ALIGNMENT)  # waits for the failed write first
        writer.close()
    writer.abort()


@pytest.mark.parametrize("direct", [True, False])
def test_read_range_returns_any_window(tmp_path: Path, direct: bool) -> None:
    payload = os.urandom(5 * ALIGNMENT + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(payload)
    for offset, nbytes, chunk in [(0, len(payload), 1000), (17, 9000, ALIGNMENT), (ALIGNMENT - 1, 2, 7)]:
        pieces = list(read_range(path, offset, nbytes, chunk, direct=direct))
        assert b"".join(pieces) == payload[offset : offset + nbytes]
        assert all(0 < len(p) <= chunk for p in pieces)
    with pytest.raises(EOFError, match=r"f\.bin"):
        list(read_range(path, len(payload) - 10, 20, 1000, direct=direct))


def test_prefetched_keeps_order_and_bounds_lookahead() -> None:
    produced = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    seen = []
    for item in prefetched(source(), depth=2):
        assert len(produced) - len(seen) <= 4  # queue depth + one in hand + one being put
        seen.append(item)
    assert seen == list(range(50))


def test_prefetched_reraises_and_stops_when_abandoned() -> None:
    def failing():
        yield 1
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        list(prefetched(failing(), depth=2))

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    iterator = prefetched(endless(), depth=2)
    assert next(iterator) == 0
    iterator.close()  # the consumer stops early: the producer thread must end, not block forever
    assert threading.active_count() == before
