"""The storage core without gRPC: parts as units, the step lock, attempts, quota reservations, names."""

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dsv3.checkpoint.partfile import PartKey, PartWriter, TensorEntry
from dsv3.checkpoint.quota import SpaceLedger, StorageFull
from dsv3.checkpoint.reader import CheckpointReader, check_manifest
from dsv3.checkpoint.steps import Superseded
from dsv3.checkpoint.storage import CorruptData, Layout, WrongState
from dsv3.rpc.v1 import tensor_pb2

U8 = tensor_pb2.DType.UINT8


def _writer(layout: Layout, key: PartKey, data: dict[str, bytes]) -> PartWriter:
    writer = PartWriter(key, [TensorEntry(n, U8, (len(d),)) for n, d in data.items()], {})
    writer.open(layout.incoming(key.job))
    for index, payload in enumerate(data.values()):
        writer.write_chunk(index, 0, payload, zlib.crc32(payload))
    writer.close()
    return writer


def _read_all(layout: Layout, manifest: dict) -> dict[str, bytes]:
    reader = CheckpointReader(layout.committed(manifest["job"], manifest["step"]), "test")
    out = {}
    try:
        for part in manifest["parts"]:
            reader.open_part(part)
            for tensor in part["tensors"]:
                out[tensor["name"]] = b"".join(reader.tensor_chunks(tensor, 1 << 16))
    finally:
        reader.close()
    return out


def _publish_and_commit_at_once(layout: Layout, step: int, writers: list[PartWriter]) -> list[object]:
    """Every writer publishes and one commit runs, all released by one barrier; each one's outcome."""
    barrier = threading.Barrier(len(writers) + 1)

    def run(call) -> object:
        barrier.wait()
        try:
            return call()
        except Exception as exc:  # refused publishes, or a commit before anything was published
            return exc

    calls = [lambda w=w: layout.publish(w) for w in writers] + [lambda: layout.commit("job", step, 1, {})[0]]
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_threads_publishing_one_part_and_a_commit_always_leave_a_consistent_part(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    for step in range(40):
        payloads = [{"a": os.urandom(4096), "b": os.urandom(4096)} for _ in range(3)]
        writers = [_writer(layout, PartKey("job", step, 0), p) for p in payloads]
        *published, committed = _publish_and_commit_at_once(layout, step, writers)
        assert all(isinstance(r, dict | WrongState) for r in published), published
        manifest = committed if isinstance(committed, dict) else layout.commit("job", step, 1, {})[0]
        loaded = _read_all(layout, manifest)
        assert loaded in payloads  # one writer's bytes, matching the CRCs that were committed
        assert isinstance(published[payloads.index(loaded)], dict)  # ... and that writer was told OK
        assert sorted(p.name for p in layout.committed("job", step).iterdir()) == sorted(
            [manifest["parts"][0]["file"], "part-00000.json", "manifest.json"]
        )


def test_attempts_order_writers_and_a_commit_closes_the_step(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.registry.claim("job", 1, 0, attempt=2)
    old = _writer(layout, PartKey("job", 1, 0, attempt=1), {"w": b"old"})
    with pytest.raises(Superseded):
        layout.registry.claim("job", 1, 0, attempt=1)
    with pytest.raises(Superseded):
        layout.publish(old)
    layout.publish(_writer(layout, PartKey("job", 1, 0, attempt=2), {"w": b"new"}))
    manifest, fresh = layout.commit("job", 1, 1, {})
    assert fresh and _read_all(layout, manifest) == {"w": b"new"}
    with pytest.raises(WrongState, match="committed while"):
        layout.publish(_writer(layout, PartKey("job", 1, 0, attempt=3), {"w": b"late"}))
    assert layout.commit("job", 1, 1, {}) == (manifest, False)


def test_commit_checks_each_part_file_against_its_record(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    record = layout.publish(_writer(layout, PartKey("job", 1, 0), {"w": b"12345678"}))
    part_file = layout.pending("job", 1) / record["file"]
    with open(part_file, "ab") as handle:
        handle.write(b"!")
    with pytest.raises(CorruptData, match=r"not \d+ bytes"):
        layout.commit("job", 1, 1, {})


def test_reservations_never_exceed_the_quota(tmp_path: Path) -> None:
    ledger = SpaceLedger(tmp_path, quota_bytes=1000, min_free_bytes=0, used_bytes=lambda: 100)
    barrier = threading.Barrier(16)

    def reserve(_: int) -> bool:
        barrier.wait()
        try:
            ledger.reserve(200)
        except StorageFull:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        granted = sum(pool.map(reserve, range(16)))
    assert granted == 4 and ledger.reserved == 800


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("part-00000.safetensors", True),  # written before part files carried a save tag
        ("part-00003-s001-of-002.0123456789ab.safetensors", True),
        ("../part-00000.safetensors", False),
        ("/etc/passwd", False),
        ("part-00000.safetensors/../../x", False),
    ],
)
def test_manifest_file_names_from_the_index(name: str, ok: bool) -> None:
    part = {"part": 0, "file": name, "size_bytes": 16, "header_bytes": 8, "header_crc32": 0, "tensors": []}
    manifest = {"job": "j", "step": 1, "parts": [part], "metadata": {}}
    if ok:
        assert check_manifest(manifest, "j", 1) is manifest
    else:
        with pytest.raises(CorruptData, match="not a part file"):
            check_manifest(manifest, "j", 1)
