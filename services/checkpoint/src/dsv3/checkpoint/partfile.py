"""One part (or segment of a part) as written by one Save stream: a safetensors file and its record.

The writer streams a part's tensors into a temporary file outside every checkpoint directory,
checking each chunk's running CRC-32. `record()` then describes exactly those bytes: the file name it
will be published under (unique per save), its size, the header's CRC and every tensor's CRC. The
record names its own data file, so a published record and the bytes it vouches for always come from
the same save (see `pending.py`, which publishes the pair).
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.checkpoint import checksum
from dsv3.checkpoint.directio import DirectWriter
from dsv3.checkpoint.names import InvalidRequest, quoted
from dsv3.serving import dtypes

WRITE_BUFFER_BYTES = 4 << 20  # two such O_DIRECT staging buffers per open Save stream
# A published data file: part-00003.safetensors-like stem, then the save's unique tag.
DATA_FILE = re.compile(r"part-\d{5}(?:-s\d{3}-of-\d{3})?\.[0-9a-f]{12}\.safetensors")
RECORD_FILE = re.compile(r"part-(\d{5})(?:-s(\d{3})-of-(\d{3}))?\.json")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, self.shape)


def part_stem(part: int, segment: int = 0, num_segments: int = 1) -> str:
    """File name stem of a part, or of one segment of a part saved over several streams."""
    if num_segments <= 1:
        return f"part-{part:05d}"
    return f"part-{part:05d}-s{segment:03d}-of-{num_segments:03d}"


def safetensors_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": dtypes.safetensors_dtype(entry.dtype),
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class PartKey:
    """Which stored unit a Save stream writes, and the attempt it belongs to."""

    job: str
    step: int
    part: int
    segment: int = 0
    num_segments: int = 1
    attempt: int = 0

    @property
    def stem(self) -> str:
        return part_stem(self.part, self.segment, self.num_segments)


class PartWriter:
    """Streams one stream's tensors into a temporary safetensors file, checking every chunk."""

    def __init__(self, key: PartKey, entries: list[TensorEntry], metadata: dict[str, str]) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise InvalidRequest("tensor names within a part must be unique")
        self.key = key
        self.entries = entries
        self.metadata = metadata
        self.tag = uuid.uuid4().hex[:12]
        self.header = safetensors_header(entries, metadata)
        self.received = [0] * len(entries)
        self.crcs = [0] * len(entries)
        self.current = 0
        self.tmp: Path | None = None
        self.file: DirectWriter | None = None

    @property
    def total_bytes(self) -> int:
        return len(self.header) + sum(e.nbytes for e in self.entries)

    @property
    def data_name(self) -> str:
        return f"{self.key.stem}.{self.tag}.safetensors"

    def open(self, incoming: Path, executor: Executor | None = None) -> None:
        """Create the temporary file under `incoming` (never inside a checkpoint) and write the header."""
        incoming.mkdir(parents=True, exist_ok=True)
        self.tmp = incoming / f"{self.key.step}-{self.data_name}.tmp"
        self.file = DirectWriter(self.tmp, WRITE_BUFFER_BYTES, executor=executor)
        self.file.write(self.header)

    def write_chunk(self, index: int, offset: int, data: bytes | memoryview, crc32: int) -> None:
        """Append the next bytes of tensor `index`; chunks must come in file order."""
        while (
            self.current < len(self.entries)
            and self.received[self.current] == self.entries[self.current].nbytes
        ):
            self.current += 1
        if index >= len(self.entries):
            raise InvalidRequest(f"chunk for tensor #{index}, but the header names {len(self.entries)}")
        if index != self.current:
            raise InvalidRequest(
                f"chunk for tensor #{index} but tensor #{self.current} is incomplete or next"
            )
        entry = self.entries[index]
        label = quoted(entry.name)
        if offset != self.received[index]:
            raise InvalidRequest(f"{label}: chunk offset {offset}, expected {self.received[index]}")
        if offset + len(data) > entry.nbytes:
            raise InvalidRequest(f"{label}: {offset + len(data)} bytes sent, tensor holds {entry.nbytes}")
        running = checksum.crc32(data, self.crcs[index])
        if running != crc32:
            raise InvalidRequest(f"{label}: checksum mismatch in chunk at offset {offset}")
        if self.file is None:
            raise InvalidRequest("chunk after the part was finished or aborted")
        self.file.write(data)
        self.crcs[index] = running
        self.received[index] += len(data)

    def close(self) -> None:
        """Check completeness and make the temporary file durable at its exact size."""
        incomplete = [e.name for e, got in zip(self.entries, self.received, strict=True) if got != e.nbytes]
        if incomplete:
            names = ", ".join(quoted(n) for n in incomplete[:3])
            raise InvalidRequest(f"stream ended before {len(incomplete)} tensor(s) were complete: {names}")
        if self.file is None:
            raise InvalidRequest("part was already finished or aborted")
        file, self.file = self.file, None
        file.close()

    def record(self) -> dict[str, Any]:
        """The part's manifest entry: its data file, size, header CRC and every tensor's CRC."""
        tensors, offset = [], len(self.header)
        for entry, crc in zip(self.entries, self.crcs, strict=True):
            tensors.append(
                {
                    "name": entry.name,
                    "dtype": int(entry.dtype),
                    "shape": list(entry.shape),
                    "offset": offset,
                    "nbytes": entry.nbytes,
                    "crc32": crc,
                }
            )
            offset += entry.nbytes
        return {
            "part": self.key.part,
            "segment": self.key.segment,
            "num_segments": self.key.num_segments,
            "attempt": self.key.attempt,
            "file": self.data_name,
            "size_bytes": offset,
            "header_crc32": checksum.crc32(self.header),
            "header_bytes": len(self.header),
            "metadata": self.metadata,
            "tensors": tensors,
        }

    def abort(self) -> None:
        """Close and remove the temporary file; safe to call at any point, and more than once."""
        if self.file is not None:
            file, self.file = self.file, None
            file.abort()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
