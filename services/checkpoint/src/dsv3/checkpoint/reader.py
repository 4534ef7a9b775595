"""Reading a committed checkpoint for Load: trusted names only, deletion told apart from corruption.

A manifest comes from the index, which anyone with access to Redis can write, so every entry is
checked before a byte is read: file names must be plain part-file names inside the checkpoint
directory, offsets must lie inside the recorded file. A part file is opened once per load and read
through that descriptor, so a Delete that runs meanwhile does not cut a tensor short (the bytes
stay readable until the descriptor closes); a file that cannot be opened because the checkpoint was
deleted is reported as such (ABORTED), not as corruption.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsv3.checkpoint import checksum
from dsv3.checkpoint.directio import open_for_reading, read_fd_range
from dsv3.checkpoint.storage import CorruptData, NotFound

# Part files of this version carry a save tag; older checkpoints have plain part-00000.safetensors.
_PART_NAME = re.compile(r"part-\d{5}(?:-s\d{3}-of-\d{3})?(?:\.[0-9a-f]{12})?\.safetensors")


class Deleted(Exception):
    """The checkpoint was deleted while it was being read (maps to ABORTED)."""


def _ints(entry: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in keys)


def check_manifest(manifest: Any, job: str, step: int) -> dict[str, Any]:
    """The index's manifest for job@step if well-formed and naming only its own files; else CorruptData."""
    label = f"index entry of {job}@{step}"
    if not isinstance(manifest, dict) or manifest.get("job") != job or manifest.get("step") != step:
        raise CorruptData(f"{label} is malformed or belongs to another checkpoint")
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not isinstance(manifest.get("metadata", {}), dict):
        raise CorruptData(f"{label} has no list of parts")
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("file"), str):
            raise CorruptData(f"{label} has a malformed part")
        if not _PART_NAME.fullmatch(part["file"]):
            raise CorruptData(f"{label} names a file that is not a part file of its checkpoint")
        if not _ints(part, "part", "size_bytes", "header_bytes", "header_crc32") or not isinstance(
            part.get("tensors"), list
        ):
            raise CorruptData(f"{label}: part file {part['file']} has malformed fields")
        for tensor in part["tensors"]:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise CorruptData(f"{label}: {part['file']} lists a malformed tensor")
            if not _ints(tensor, "offset", "nbytes", "crc32", "dtype") or not isinstance(
                tensor.get("shape"), list
            ):
                raise CorruptData(f"{label}: {part['file']} lists a malformed tensor")
            if (
                tensor["offset"] < part["header_bytes"]
                or tensor["offset"] + tensor["nbytes"] > part["size_bytes"]
            ):
                raise CorruptData(f"{label}: a tensor of {part['file']} lies outside the file")
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


class CheckpointReader:
    """One load's view of a committed checkpoint directory; one part file open at a time."""

    def __init__(self, directory: Path, label: str) -> None:
        self.directory = directory
        self.label = label
        try:
            self._inode = os.stat(directory).st_ino
        except FileNotFoundError:
            raise NotFound(f"{label} was deleted") from None
        self._file: str | None = None
        self._fd = -1
        self._direct = False

    def _deleted(self) -> bool:
        try:
            return os.stat(self.directory).st_ino != self._inode
        except FileNotFoundError:
            return True

    def open_part(self, part: dict[str, Any]) -> None:
        """Open and verify a part file (size and header CRC) unless it is the one already open."""
        if part["file"] == self._file:
            return
        self.close()
        path = self.directory / part["file"]  # a checked plain name: stays inside the directory
        try:
            fd, direct = open_for_reading(path)
        except FileNotFoundError:
            if self._deleted():
                raise Deleted(f"{self.label} was deleted during this load") from None
            raise CorruptData(f"{path.name} is missing") from None
        try:
            size = os.fstat(fd).st_size
            if size != part["size_bytes"]:
                raise CorruptData(f"{path.name} holds {size} bytes, its manifest says {part['size_bytes']}")
            header = b"".join(read_fd_range(fd, direct, 0, part["header_bytes"], part["header_bytes"] or 1))
            if checksum.crc32(header) != part["header_crc32"]:
                raise CorruptData(f"{path.name}: header checksum mismatch")
        except BaseException:
            os.close(fd)
            raise
        self._file, self._fd, self._direct = part["file"], fd, direct

    def tensor_chunks(
        self, tensor: dict[str, Any], chunk_bytes: int, frame: Callable[[memoryview], bytes] = bytes
    ) -> Iterator[bytes]:
        """Yield `frame(piece)` for a tensor of the open part (CorruptData before its end on a bad CRC)."""
        name, remaining, crc = self._file, tensor["nbytes"], 0

        def checked(piece: memoryview) -> bytes:
            nonlocal remaining, crc
            crc = checksum.crc32(piece, crc)
            remaining -= len(piece)
            if remaining == 0 and crc != tensor["crc32"]:
                raise CorruptData(f"{name}: checksum mismatch in tensor {tensor['name']}")
            return frame(piece)

        try:
            yield from read_fd_range(
                self._fd, self._direct, tensor["offset"], tensor["nbytes"], chunk_bytes, checked, label=name
            )
        except EOFError:
            raise CorruptData(f"{name}: truncated inside {tensor['name']}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._file, self._fd = None, -1
