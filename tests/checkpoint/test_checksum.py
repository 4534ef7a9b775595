"""The fast CRC-32 is the zlib one: stored manifests and other clients keep verifying."""

import mmap
import os
import zlib

import pytest

from dsv3.checkpoint.checksum import crc32


@pytest.mark.parametrize("size", [0, 1, 15, 16, 4096, 1_000_003])
def test_equals_zlib_in_one_piece_and_running(size: int) -> None:
    data = os.urandom(size)
    assert crc32(data) == zlib.crc32(data)
    cut = size // 3
    assert crc32(data[cut:], crc32(data[:cut])) == zlib.crc32(data)


def test_reads_writable_buffers_without_copies() -> None:
    data = os.urandom(10_000)
    with mmap.mmap(-1, len(data)) as buffer:
        buffer.write(data)
        view = memoryview(buffer)
        assert crc32(view[100:9000], 12345) == zlib.crc32(data[100:9000], 12345)
        view.release()
