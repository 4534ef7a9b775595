"""SIGKILL in the middle of a save: committed data survives bit-exact, the interrupted save vanishes."""

import threading
import time
import zlib

import grpc
import pytest
import torch

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2

CHUNK = 1 << 20


def _stalling_save(address: str, sent_enough: threading.Event, release: threading.Event) -> threading.Thread:
    """A real Save stream that sends 8 MiB of a 32 MiB tensor, then waits (the server gets killed)."""
    header = checkpoint_pb2.SaveHeader(
        job="job",
        step=2,
        tensors=[tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DType.UINT8, shape=[32 * CHUNK])],
    )

    def requests():
        yield checkpoint_pb2.SaveRequest(header=header)
        crc = 0
        for i in range(32):
            data = bytes([i]) * CHUNK
            crc = zlib.crc32(data, crc)
            yield checkpoint_pb2.SaveRequest(
                chunk=checkpoint_pb2.SaveChunk(offset=i * CHUNK, data=data, crc32=crc)
            )
            if i == 7:
                sent_enough.set()
                release.wait(30)

    def run() -> None:
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            checkpoint_pb2_grpc.CheckpointServiceStub(channel).Save(requests(), timeout=60)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("index", ["embedded", "redis-restarted-empty"])
def test_sigkill_mid_save(make_server, redis_server, tmp_path, index: str) -> None:
    redis_url = redis_server.url if index != "embedded" else None
    data_dir = tmp_path / "crash-data"
    srv = make_server(redis_url, data_dir=data_dir)
    committed = {"w": torch.randn(512, 1024), "step": torch.tensor([1])}
    with CheckpointClient(srv.address) as client:
        client.save("job", 1, committed, metadata={"loss": 3.0})
        client.commit("job", 1)

    sent_enough, release = threading.Event(), threading.Event()
    writer = _stalling_save(srv.address, sent_enough, release)
    assert sent_enough.wait(30)
    incoming = data_dir / "jobs" / "job" / "incoming"  # streams are written outside any checkpoint
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size > 4 * CHUNK for p in incoming.glob("*.tmp")):
        assert time.monotonic() < deadline, "the server never wrote the partial part"
        time.sleep(0.01)
    srv.kill()  # SIGKILL while the part file is half written
    release.set()
    writer.join(30)
    assert any(incoming.iterdir())  # the partial bytes are really on disk ...

    if redis_url:
        redis_server.flushall()  # Redis lost everything: the index must come back from the manifests
    restarted = make_server(redis_url, data_dir=data_dir)
    assert not incoming.exists()  # ... and gone after the restart
    assert not (data_dir / "jobs" / "job" / "pending").exists()
    with CheckpointClient(restarted.address) as client:
        assert client.list("job") == [1] and client.latest("job") == 1
        loaded = client.load("job")
        assert all(torch.equal(loaded[k], committed[k]) for k in committed)
        assert client.checkpoints("job")[0].metadata["loss"] == "3.0"
        with pytest.raises(grpc.RpcError) as err:
            client.commit("job", 2)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigkill_during_concurrent_saves_and_commits(make_server, tmp_path) -> None:
    """Kill the server while several ranks save and commit; after each restart every listed checkpoint
    loads bit-exact, holds only the files its manifest names, and nothing uncommitted is left."""
    data_dir = tmp_path / "kill-data"
    expected: dict[int, dict[str, torch.Tensor]] = {}
    for trial in range(4):
        srv = make_server(None, data_dir=data_dir)
        stop = threading.Event()

        def rank_loop(
            rank: int, address: str = srv.address, stop: threading.Event = stop, first: int = trial * 1000
        ) -> None:
            with CheckpointClient(address, retries=0, streams=2) as client:
                step = first
                while not stop.is_set():
                    step += 1
                    tensors = {f"r{rank}.{i}": torch.full((4096,), float(step * 10 + i)) for i in range(3)}
                    try:
                        client.save("kill", step, tensors, part=rank)
                        if rank == 0:
                            time.sleep(0.005)
                            client.commit("kill", step, num_parts=2)
                    except grpc.RpcError:
                        return

        ranks = [threading.Thread(target=rank_loop, args=(r,)) for r in range(2)]
        for t in ranks:
            t.start()
        time.sleep(0.4 + 0.15 * trial)
        srv.kill()
        stop.set()
        for t in ranks:
            t.join(30)
        restarted = make_server(None, data_dir=data_dir)
        job_dir = data_dir / "jobs" / "kill"
        assert not (job_dir / "pending").exists() and not (job_dir / "incoming").exists()
        with CheckpointClient(restarted.address) as client:
            for info in client.checkpoints("kill"):
                loaded = client.load("kill", info.step)
                want = {
                    f"r{r}.{i}": torch.full((4096,), float(info.step * 10 + i))
                    for r in range(2)
                    for i in range(3)
                }
                assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
                stored = {p.name for p in (job_dir / "committed" / f"{info.step:012d}").iterdir()}
                named = {p.file for p in info.parts} | {f"{p.file.split('.')[0]}.json" for p in info.parts}
                assert stored == named | {"manifest.json"}
                expected[info.step] = want
        restarted.stop()
    assert expected  # some commits landed before the kills
