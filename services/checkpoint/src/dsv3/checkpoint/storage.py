"""On-disk layout of checkpoints: publishing parts, atomic commit, deletion, crash recovery.

    <data_dir>/jobs/<job>/incoming/<step>-<file>.tmp          Save streams being written (never inside
                                                              a checkpoint directory)
    <data_dir>/jobs/<job>/pending/<step>/part-00000.json      a published part's record, naming its
                                                              data file part-00000.<tag>.safetensors
        (a part saved over N streams: part-00000-s000-of-004.json ... one record and file per stream)
    <data_dir>/jobs/<job>/committed/<step:012d>/              a committed checkpoint: its data files
                                                              and records, manifest.json
    <data_dir>/jobs/<job>/trash/                              deletions in progress

A part is one unit: its data file gets a name unique to the save that wrote it, and its record
(every CRC) names that file. Publishing renames the data file in, then atomically replaces the
record, both under the step's lock (`steps.StepRegistry`); the bytes and checksums of a part
therefore always come from one save. Commit holds the same lock, re-checks every record against its
file, writes manifest.json, fsyncs it and renames the directory into committed/: a rename is
atomic, so after a crash a checkpoint is either fully committed or not at all.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from dsv3.checkpoint import checksum
from dsv3.checkpoint.names import quoted
from dsv3.checkpoint.partfile import RECORD_FILE, PartWriter
from dsv3.checkpoint.steps import StepRegistry, Superseded
from dsv3.serving import dtypes

MANIFEST = "manifest.json"
NAMED = 5  # at most this many missing parts or duplicate names are named in an error


class CorruptData(Exception):
    """Stored bytes do not match their recorded checksum (maps to DATA_LOSS); names the file."""


class NotFound(Exception):
    """No such job, step, part or tensor (maps to NOT_FOUND)."""


class WrongState(Exception):
    """The request is valid but the checkpoint is not in a state that allows it (FAILED_PRECONDITION)."""


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def read_manifest(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not {"job", "step", "parts"} <= manifest.keys():
        raise ValueError(f"{directory / MANIFEST} lacks job/step/parts")
    return manifest


def _records(pending: Path) -> list[dict[str, Any]]:
    records = []
    for path in pending.glob("part-*.json"):
        if RECORD_FILE.fullmatch(path.name):
            record = json.loads(path.read_text())
            record["_record"] = path.name
            records.append(record)
    return records


def _newest_attempts(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Per part, the records of its newest attempt only (older attempts are superseded)."""
    by_part: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_part.setdefault(record["part"], []).append(record)
    for part, group in by_part.items():
        newest = max(r.get("attempt", 0) for r in group)
        by_part[part] = [r for r in group if r.get("attempt", 0) == newest]
    return by_part


def _complete_segments(label: str, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A part's segment records in order, if they are one consistent, complete, name-unique set."""
    counts = {s.get("num_segments", 1) for s in segments}
    if len(counts) != 1:
        raise WrongState(f"{label} was saved with different segment counts {sorted(counts)}; save it again")
    (count,) = counts
    have = sorted(s.get("segment", 0) for s in segments)
    if have != list(range(count)):
        raise WrongState(f"{label}: segments {have[:NAMED]} of {count} have been saved")
    return sorted(segments, key=lambda s: s.get("segment", 0))


def check_part_file(path: Path, record: dict[str, Any]) -> None:
    """CorruptData unless `path` holds exactly the bytes `record` describes: size, header, tensor table."""
    if not path.is_file() or path.stat().st_size != record["size_bytes"]:
        raise CorruptData(f"{path.name}: missing or not {record['size_bytes']} bytes")
    with open(path, "rb") as handle:
        raw = handle.read(record["header_bytes"])
    if checksum.crc32(raw) != record["header_crc32"]:
        raise CorruptData(f"{path.name}: header checksum mismatch")
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    base = record["header_bytes"]
    table = {
        t["name"]: {
            "dtype": dtypes.safetensors_dtype(t["dtype"]),
            "shape": t["shape"],
            "data_offsets": [t["offset"] - base, t["offset"] - base + t["nbytes"]],
        }
        for t in record["tensors"]
    }
    if header != table:
        raise CorruptData(f"{path.name}: its header does not describe the tensors of its record")


class Layout:
    """Paths and directory-level operations under one data directory."""

    def __init__(self, data_dir: Path, registry: StepRegistry | None = None) -> None:
        self.root = data_dir
        self.jobs = data_dir / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.registry = registry or StepRegistry()

    def pending(self, job: str, step: int) -> Path:
        return self.jobs / job / "pending" / str(step)

    def committed(self, job: str, step: int) -> Path:
        return self.jobs / job / "committed" / f"{step:012d}"

    def incoming(self, job: str) -> Path:
        return self.jobs / job / "incoming"

    def used_bytes(self) -> int:
        """Bytes stored, streams in flight excluded (they hold quota reservations instead).

        Files may vanish while they are counted (a commit renaming, a delete): those count as gone.
        """
        total = 0
        for top, dirs, files in os.walk(self.jobs):
            if Path(top).parent == self.jobs:
                dirs[:] = [d for d in dirs if d != "incoming"]
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(top, name), follow_symlinks=False).st_size
        return total

    # ---- parts ----------------------------------------------------------------------------------
    def publish(self, writer: PartWriter) -> dict[str, Any]:
        """Move a closed part into its pending step as one unit; returns its record.

        Refused when the step was committed meanwhile (WrongState) or a newer attempt of the part
        exists (Superseded). Files of this part that the new record supersedes are removed.
        """
        key = writer.key
        assert writer.tmp is not None, "publish before open"
        with self.registry.locked(key.job, key.step):
            self.registry.check(key.job, key.step, key.part, key.attempt)
            if self.committed(key.job, key.step).exists():
                raise WrongState(f"{key.job}@{key.step} was committed while this part was being saved")
            pending = self.pending(key.job, key.step)
            pending.mkdir(parents=True, exist_ok=True)
            same_part = [r for r in _records(pending) if r["part"] == key.part]
            newest = max((r.get("attempt", 0) for r in same_part), default=key.attempt)
            if key.attempt < newest:
                raise Superseded(f"{key.job}@{key.step} part {key.part}: attempt {newest} was saved already")
            record = writer.record()
            os.rename(writer.tmp, pending / writer.data_name)
            write_json_atomic(pending / f"{key.stem}.json", record)  # the unit's single switch-over
            for old in same_part:
                mine = old["_record"] == f"{key.stem}.json"
                if (
                    mine
                    or old.get("attempt", 0) < key.attempt
                    or old.get("num_segments", 1) != key.num_segments
                ):
                    if not mine:
                        (pending / old["_record"]).unlink(missing_ok=True)
                    if old["file"] != writer.data_name:
                        (pending / old["file"]).unlink(missing_ok=True)
            return record

    # ---- commit ---------------------------------------------------------------------------------
    def commit(
        self, job: str, step: int, num_parts: int, metadata: dict[str, str]
    ) -> tuple[dict[str, Any], bool]:
        """Verify the pending parts and rename them into a committed checkpoint.

        Returns (manifest, whether this call committed it); a repeated commit returns the manifest.
        """
        with self.registry.locked(job, step):
            target = self.committed(job, step)
            if target.exists():
                manifest = self._existing(job, step)
                have = len({p["part"] for p in manifest["parts"]})
                if have != num_parts:
                    raise WrongState(f"{job}@{step} is already committed with {have} parts")
                return manifest, False
            pending = self.pending(job, step)
            if not pending.is_dir():
                raise NotFound(f"nothing was saved for {job}@{step}")
            saved = _newest_attempts(_records(pending))
            missing = [p for p in range(num_parts) if p not in saved]  # num_parts <= names.MAX_PARTS
            if missing:
                raise WrongState(
                    f"{job}@{step}: {len(missing)} of {num_parts} parts have not been saved, "
                    f"e.g. {missing[:NAMED]}"
                )
            extra = sorted(p for p in saved if p >= num_parts)
            if extra:
                raise WrongState(f"{job}@{step}: found parts beyond num_parts={num_parts}: {extra[:NAMED]}")
            parts = []
            for part in range(num_parts):
                parts.extend(_complete_segments(f"{job}@{step} part {part}", saved[part]))
            keep = {MANIFEST}
            for record in parts:
                check_part_file(pending / record["file"], record)
                keep |= {record["file"], record.pop("_record")}
            _refuse_duplicate_names(f"{job}@{step}", parts)
            for path in pending.iterdir():  # superseded records and files: the checkpoint holds what it lists
                if path.name not in keep:
                    path.unlink(missing_ok=True)
            merged: dict[str, str] = {}
            for record in parts:
                merged.update(record["metadata"])
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
            fsync_dir(target.parent)
            self.registry.forget(job, step)
            return manifest, True

    def _existing(self, job: str, step: int) -> dict[str, Any]:
        try:
            return read_manifest(self.committed(job, step))
        except (OSError, ValueError) as exc:
            raise WrongState(
                f"{job}@{step} is committed but its manifest is unreadable ({type(exc).__name__}); delete it"
            ) from None

    def uncommit(self, job: str, step: int) -> None:
        """Undo a commit whose index entry could not be written: the parts become pending again."""
        with self.registry.locked(job, step):
            target, pending = self.committed(job, step), self.pending(job, step)
            if not target.exists() or pending.exists():
                return
            pending.parent.mkdir(parents=True, exist_ok=True)
            os.rename(target, pending)
            (pending / MANIFEST).unlink(missing_ok=True)
            fsync_dir(pending.parent)

    # ---- deletion, expiry, recovery -------------------------------------------------------------
    def delete(self, job: str, step: int) -> str:
        """Remove a committed checkpoint (even one whose manifest is gone) or discard pending parts.

        Returns "committed" or "pending"; NotFound when neither exists.
        """
        with self.registry.locked(job, step):
            source = self.committed(job, step)
            what = "committed"
            if not source.exists():
                source, what = self.pending(job, step), "pending"
                if not source.exists():
                    raise NotFound(f"no checkpoint {job}@{step}")
                self.registry.forget(job, step)
            trash = self.jobs / job / "trash"
            trash.mkdir(parents=True, exist_ok=True)
            doomed = trash / f"{step}-{uuid.uuid4().hex}"
            os.rename(source, doomed)  # invisible at once; the bytes go next
        shutil.rmtree(doomed, ignore_errors=True)
        return what

    def expire_pending(self, older_than_s: float) -> list[tuple[str, int]]:
        """Discard pending steps nobody is writing whose newest file is older than `older_than_s`."""
        removed, cutoff = [], time.time() - older_than_s
        for step_dir in self.jobs.glob("*/pending/*"):
            job = step_dir.parent.parent.name
            if not step_dir.name.isdigit():
                continue
            step = int(step_dir.name)
            with self.registry.locked(job, step):
                if not step_dir.is_dir() or self.registry.writing(job, step):
                    continue
                newest = max(
                    (p.stat().st_mtime for p in step_dir.iterdir()), default=step_dir.stat().st_mtime
                )
                if newest < cutoff:
                    shutil.rmtree(step_dir, ignore_errors=True)
                    self.registry.forget(job, step)
                    removed.append((job, step))
        return removed

    def recover(self) -> list[dict[str, Any]]:
        """Drop everything uncommitted; return the manifests of every committed checkpoint on disk."""
        for job_dir in sorted(p for p in self.jobs.iterdir() if p.is_dir()):
            for transient in ("pending", "trash", "incoming"):
                shutil.rmtree(job_dir / transient, ignore_errors=True)
            for stray in job_dir.glob("committed/*/.*.tmp"):
                stray.unlink()
        return self.committed_manifests()

    def committed_manifests(self) -> list[dict[str, Any]]:
        """Every readable committed manifest on disk (read-only: safe while the server runs)."""
        manifests = []
        for step_dir in sorted(self.jobs.glob("*/committed/*")):
            try:
                manifests.append(read_manifest(step_dir))
            except (OSError, ValueError, KeyError):
                continue  # unreadable manifest: leave the bytes for an operator, do not index them
        return manifests


def _refuse_duplicate_names(label: str, parts: list[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    twice = []
    for record in parts:
        for tensor in record["tensors"]:
            if tensor["name"] in seen:
                twice.append(tensor["name"])
            seen[tensor["name"]] = record["part"]
    if twice:
        named = ", ".join(quoted(n) for n in itertools.islice(dict.fromkeys(twice), NAMED))
        raise WrongState(
            f"{label}: {len(twice)} tensor name(s) appear in more than one part or segment: {named}"
        )
