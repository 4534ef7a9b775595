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
