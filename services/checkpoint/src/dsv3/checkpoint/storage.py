"""On-disk layout of checkpoints: safetensors part files, manifests, atomic commit, crash recovery.

    <data_dir>/jobs/<job>/pending/<step>/part-00000.safetensors   parts being gathered (invisible);
        a part saved over N streams is N files, part-00000-s000-of-004.safetensors ...
    <data_dir>/jobs/<job>/committed/<step:012d>/                   a committed checkpoint:
        part-*.safetensors, manifest.json (every part, tensor, offset and CRC-32)
    <data_dir>/jobs/<job>/trash/                                   deletions in progress

Commit writes manifest.json into the pending directory, fsyncs it, then renames the directory into
committed/: a rename is atomic, so after a crash a checkpoint is either fully committed or not at
all. Every byte of a part file is covered by a checksum in its manifest: the header by
`header_crc32`, each tensor by its own `crc32` (so a selective load verifies only what it reads).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.checkpoint import checksum
from dsv3.checkpoint.directio import DirectWriter, read_range
from dsv3.checkpoint.names import InvalidRequest
from dsv3.serving import dtypes

MANIFEST = "manifest.json"


class CorruptData(Exception):
    """Stored bytes do not match their recorded checksum (maps to DATA_LOSS); names the file."""


class NotFound(Exception):
    """No such job, step, part or tensor (maps to NOT_FOUND)."""


class WrongState(Exception):
    """The request is valid but the checkpoint is not in a state that allows it (FAILED_PRECONDITION)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, self.shape)


def _safetensors_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
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


_PART_FILE = re.compile(r"^part-(\d+)(?:-s(\d+)-of-(\d+))?\.json$")


def part_stem(part: int, segment: int = 0, num_segments: int = 1) -> str:
    """File name stem of a part, or of one segment of a part saved over several streams."""
    if num_segments <= 1:
        return f"part-{part:05d}"
    return f"part-{part:05d}-s{segment:03d}-of-{num_segments:03d}"


class PartWriter:
    """Streams one part's (or segment's) tensors into a temporary safetensors file, checking each chunk."""

    def __init__(
        self,
        directory: Path,
        part: int,
        entries: list[TensorEntry],
        metadata: dict[str, str],
        segment: int = 0,
        num_segments: int = 1,
    ) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise InvalidRequest("tensor names within a part must be unique")
        self.directory = directory
        self.part = part
        self.segment = segment
        self.num_segments = num_segments
        self.entries = entries
        self.metadata = metadata
        self.stem = part_stem(part, segment, num_segments)
        self.final = directory / f"{self.stem}.safetensors"
        self.tmp = directory / f".{self.stem}.{uuid.uuid4().hex}.tmp"
        self.header = _safetensors_header(entries, metadata)
        self.received = [0] * len(entries)
        self.crcs = [0] * len(entries)
        self.current = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.file: DirectWriter | None = DirectWriter(self.tmp)
        self.file.write(self.header)

    @property
    def total_bytes(self) -> int:
        return len(self.header) + sum(e.nbytes for e in self.entries)

    def write_chunk(self, index: int, offset: int, data: bytes, crc32: int) -> None:
        """Append the next bytes of tensor `index`; chunks must come in file order."""
        while (
            self.current < len(self.entries)
            and self.received[self.current] == self.entries[self.current].nbytes
        ):
            self.current += 1
        if index != self.current:
            raise InvalidRequest(
                f"chunk for tensor #{index} but tensor #{self.current} is incomplete or next"
            )
        entry = self.entries[index]
        if offset != self.received[index]:
            raise InvalidRequest(f"{entry.name}: chunk offset {offset}, expected {self.received[index]}")
        if offset + len(data) > entry.nbytes:
            raise InvalidRequest(
                f"{entry.name}: {offset + len(data)} bytes sent, tensor holds {entry.nbytes}"
            )
        running = checksum.crc32(data, self.crcs[index])
        if running != crc32:
            raise InvalidRequest(f"{entry.name}: checksum mismatch in chunk at offset {offset}")
        assert self.file is not None, "write_chunk after finish/abort"
        self.file.write(data)
        self.crcs[index] = running
        self.received[index] += len(data)

    def finish(self) -> dict[str, Any]:
        """fsync, move into place and return the part's manifest entry."""
        incomplete = [e.name for e, got in zip(self.entries, self.received, strict=True) if got != e.nbytes]
        if incomplete:
            raise InvalidRequest(f"stream ended before these tensors were complete: {incomplete[:5]}")
        assert self.file is not None, "finish after abort"
        file, self.file = self.file, None
        file.close()  # durable at its exact size
        os.replace(self.tmp, self.final)
        _fsync_dir(self.directory)
        data_start = len(self.header)
        tensors, offset = [], data_start
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
        manifest = {
            "part": self.part,
            "segment": self.segment,
            "num_segments": self.num_segments,
            "file": self.final.name,
            "size_bytes": offset,
            "header_crc32": checksum.crc32(self.header),
            "header_bytes": len(self.header),
            "metadata": self.metadata,
            "tensors": tensors,
        }
        write_json_atomic(self.directory / f"{self.stem}.json", manifest)
        self._drop_other_segmentations()
        return manifest

    def _drop_other_segmentations(self) -> None:
        """Forget files of this part left by an earlier attempt that split it into a different count."""
        for path in self.directory.glob("part-*.json"):
            found = _PART_FILE.match(path.name)
            if found and int(found[1]) == self.part and int(found[3] or 1) != self.num_segments:
                path.unlink(missing_ok=True)
                path.with_suffix(".safetensors").unlink(missing_ok=True)

    def abort(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            file.abort()
        self.tmp.unlink(missing_ok=True)


class Layout:
    """Paths and directory-level operations under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.jobs = data_dir / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)

    def pending(self, job: str, step: int) -> Path:
        return self.jobs / job / "pending" / str(step)

    def committed(self, job: str, step: int) -> Path:
        return self.jobs / job / "committed" / f"{step:012d}"

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.jobs.rglob("*") if f.is_file())

    def commit(self, job: str, step: int, num_parts: int, metadata: dict[str, str]) -> dict[str, Any]:
        """Verify the pending parts and rename them into a committed checkpoint; returns its manifest."""
        target = self.committed(job, step)
        if target.exists():
            manifest = read_manifest(target)
            if len(manifest["parts"]) != num_parts:
                raise WrongState(f"{job}@{step} is already committed with {len(manifest['parts'])} parts")
            return manifest
        pending = self.pending(job, step)
        if not pending.is_dir():
            raise NotFound(f"nothing was saved for {job}@{step}")
        saved: dict[int, list[dict[str, Any]]] = {}
        for path in pending.glob("part-*.json"):
            if _PART_FILE.match(path.name):
                entry = json.loads(path.read_text())
                saved.setdefault(entry["part"], []).append(entry)
        missing = [p for p in range(num_parts) if p not in saved]
        extra = sorted(p for p in saved if p >= num_parts)
        if missing:
            raise WrongState(f"{job}@{step}: parts {missing} of {num_parts} have not been saved")
        if extra:
            raise WrongState(f"{job}@{step}: found parts beyond num_parts={num_parts}: {extra}")
        parts = []
        for part in range(num_parts):
            segments = _complete_segments(f"{job}@{step} part {part}", saved[part])
            parts.extend(self._verified_part(pending, segment) for segment in segments)
        merged: dict[str, str] = {}
        for part in parts:
            merged.update(part["metadata"])
        merged.update(metadata)
        manifest = {
            "job": job,
            "step": step,
            "parts": parts,
            "metadata": merged,
            "total_bytes": sum(p["size_bytes"] for p in parts),
            "committed_unix_ms": int(time.time() * 1000),
        }
        write_json_atomic(pending / MANIFEST, manifest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(pending, target)
        _fsync_dir(target.parent)
        return manifest

    @staticmethod
    def _verified_part(directory: Path, part: dict[str, Any]) -> dict[str, Any]:
        path = directory / part["file"]
        if not path.exists() or path.stat().st_size != part["size_bytes"]:
            raise CorruptData(f"{path.name}: missing or not {part['size_bytes']} bytes")
        _check_header(path, part)
        return part

    def delete(self, job: str, step: int) -> None:
        source = self.committed(job, step)
        if not source.exists():
            raise NotFound(f"no committed checkpoint {job}@{step}")
        trash = self.jobs / job / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        doomed = trash / f"{step}-{uuid.uuid4().hex}"
        os.rename(source, doomed)  # invisible at once; the bytes go next
        shutil.rmtree(doomed, ignore_errors=True)

    def recover(self) -> list[dict[str, Any]]:
        """Drop everything uncommitted; return the manifests of every committed checkpoint on disk."""
        manifests = []
        for job_dir in sorted(p for p in self.jobs.iterdir() if p.is_dir()):
            for transient in ("pending", "trash"):
                shutil.rmtree(job_dir / transient, ignore_errors=True)
            committed = job_dir / "committed"
            for step_dir in sorted(committed.iterdir()) if committed.is_dir() else []:
                for stray in step_dir.glob(".*.tmp"):
                    stray.unlink()
                try:
                    manifests.append(read_manifest(step_dir))
                except (OSError, ValueError, KeyError):
                    continue  # unreadable manifest: leave the bytes for an operator, do not index them
        return manifests


def _complete_segments(label: str, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A part's segment manifests in order, if they are one consistent, complete, name-unique set."""
    counts = {s.get("num_segments", 1) for s in segments}
    if len(counts) != 1:
        raise WrongState(f"{label} was saved with different segment counts {sorted(counts)}; save it again")
    (count,) = counts
    have = sorted(s.get("segment", 0) for s in segments)
    if have != list(range(count)):
        raise WrongState(f"{label}: segments {have} of {count} have been saved")
    ordered = sorted(segments, key=lambda s: s.get("segment", 0))
    names = [t["name"] for s in ordered for t in s["tensors"]]
    if len(set(names)) != len(names):
        raise WrongState(f"{label}: a tensor name appears in more than one segment")
    return ordered


def read_manifest(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / MANIFEST).read_text())
    if not {"job", "step", "parts"} <= manifest.keys():
        raise ValueError(f"{directory / MANIFEST} lacks job/step/parts")
    return manifest


def select_tensors(manifest: dict[str, Any], names: list[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(part, tensor) pairs to send, in file order; every requested name must exist."""
    pairs = [(part, tensor) for part in manifest["parts"] for tensor in part["tensors"]]
    if not names:
        return pairs
    wanted = set(names)
    chosen = [(p, t) for p, t in pairs if t["name"] in wanted]
    missing = wanted - {t["name"] for _, t in chosen}
    if missing:
        raise NotFound(f"{manifest['job']}@{manifest['step']} has no tensor(s) {sorted(missing)[:5]}")
    return chosen


def _check_header(path: Path, part: dict[str, Any]) -> None:
    with open(path, "rb") as handle:
        if checksum.crc32(handle.read(part["header_bytes"])) != part["header_crc32"]:
            raise CorruptData(f"{path.name}: header checksum mismatch")


def verify_part_file(directory: Path, part: dict[str, Any]) -> None:
    """Raise CorruptData (naming the file) if a committed part file is gone or its header changed."""
    path = directory / part["file"]
    if not path.is_file():
        raise CorruptData(f"{path.name} is missing")
    _check_header(path, part)


def read_tensor_chunks(
    directory: Path,
    part: dict[str, Any],
    tensor: dict[str, Any],
    chunk_bytes: int,
    frame: Callable[[memoryview], bytes] = bytes,
) -> Iterator[bytes]:
    """Yield `frame(piece)` for the tensor's stored bytes, in order; `frame` copies (default: `bytes`).

    The part file must have passed `verify_part_file` (once per load, not once per tensor). Raises
    CorruptData (naming the file) if the tensor's CRC does not match, before its last piece.
    """
    path = directory / part["file"]
    remaining, crc = tensor["nbytes"], 0

    def checked(piece: memoryview) -> bytes:
        nonlocal remaining, crc
        crc = checksum.crc32(piece, crc)
        remaining -= len(piece)
        if remaining == 0 and crc != tensor["crc32"]:
            raise CorruptData(f"{path.name}: checksum mismatch in tensor {tensor['name']}")
        return frame(piece)

    try:
        yield from read_range(path, tensor["offset"], tensor["nbytes"], chunk_bytes, copy=checked)
    except EOFError:
        raise CorruptData(f"{path.name}: truncated inside {tensor['name']}") from None
