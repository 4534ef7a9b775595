"""Saving, committing and loading through the real service (embedded index and Redis index)."""

import threading
import zlib

import grpc
import pytest
import torch
from safetensors import safe_open

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(_bits(got[name]), _bits(tensor)), name


def _mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "w.bf16": torch.randn(33, 70).bfloat16(),
        "w.fp32": torch.randn(300, 257),  # several 64 KiB chunks
        "w.fp8": (torch.randn(16, 128) * 100).to(torch.float8_e4m3fn),
        "step.int64": torch.tensor([2**62, -5, 0]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(8, 6).T,  # not contiguous
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def test_round_trip_is_bit_exact(client: CheckpointClient, server, file_holding) -> None:
    tensors = _mixed_tensors()
    client.save("job-a", 100, tensors, metadata={"loss": 2.25, "tokens": 123})
    info = client.commit("job-a", 100)
    assert info.metadata["loss"] == "2.25" and info.total_bytes > 300 * 257 * 4
    _assert_bit_exact(client.load("job-a", 100), tensors)
    _assert_bit_exact(client.load("job-a"), tensors)  # latest
    # the stored part is an ordinary safetensors file
    (committed,) = (server.data_dir / "jobs" / "job-a" / "committed").iterdir()
    part = file_holding(committed, "w.fp32")
    with safe_open(part, framework="pt") as handle:
        assert torch.equal(handle.get_tensor("w.fp32"), tensors["w.fp32"])
        assert handle.metadata() == {"loss": "2.25", "tokens": "123"}


def test_uncommitted_data_is_invisible(client: CheckpointClient) -> None:
    client.save("job-b", 1, {"x": torch.ones(3)})
    assert client.list("job-b") == [] and client.latest("job-b") is None
    with pytest.raises(grpc.RpcError) as err:
        client.load("job-b", 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_four_concurrent_writers_one_checkpoint(client: CheckpointClient, server) -> None:
    shards = {rank: {f"rank{rank}.w{i}": torch.randn(200, 100 + rank) for i in range(3)} for rank in range(4)}
    errors: list[BaseException] = []

    def write(rank: int) -> None:
        try:
            with CheckpointClient(server.address, chunk_bytes=16 << 10, streams=3) as own:
                own.save("job-c", 7, shards[rank], part=rank, metadata={f"rank{rank}": rank})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(rank,)) for rank in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    info = client.commit("job-c", 7, num_parts=4)
    # each writer's part arrived over three streams (one per tensor): 4 parts x 3 segment files
    assert [(p.part, p.segment, p.num_segments) for p in info.parts] == [
        (part, segment, 3) for part in range(4) for segment in range(3)
    ]
    assert {f"rank{r}" for r in range(4)} <= set(info.metadata)
    _assert_bit_exact(client.load("job-c", 7), {k: v for shard in shards.values() for k, v in shard.items()})


def test_selective_load_of_one_expert(client: CheckpointClient) -> None:
    tensors = {
        f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight": torch.randn(24, 16)
        for layer in (3, 4)
        for e in range(8)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    client.save("moe", 5, tensors)
    client.commit("moe", 5)
    names = [f"model.layers.3.mlp.experts.7.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    _assert_bit_exact(client.load("moe", 5, names=names), {n: tensors[n] for n in names})
    with pytest.raises(grpc.RpcError) as err:
        client.load("moe", 5, names=["model.layers.9.mlp.experts.0.up_proj.weight"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "layers.9" in err.value.details()


def test_commit_needs_every_part(client: CheckpointClient) -> None:
    client.save("job-d", 3, {"a": torch.ones(2)}, part=0)
    client.save("job-d", 3, {"b": torch.ones(2)}, part=2)
    with pytest.raises(grpc.RpcError) as err:
        client.commit("job-d", 3, num_parts=3)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "[1]" in err.value.details()
    client.save("job-d", 3, {"c": torch.ones(2)}, part=1)
    assert len(client.commit("job-d", 3, num_parts=3).parts) == 3
    assert client.commit("job-d", 3, num_parts=3).step == 3  # idempotent
    with pytest.raises(grpc.RpcError) as err:
        client.save("job-d", 3, {"a": torch.ones(2)})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_list_latest_delete(client: CheckpointClient, server) -> None:
    for step in (10, 30, 20):
        client.save("job-e", step, {"w": torch.full((4,), float(step))})
        client.commit("job-e", step)
    assert client.list("job-e") == [10, 20, 30] and client.latest("job-e") == 30
    client.delete("job-e", 30)
    assert client.list("job-e") == [10, 20] and client.latest("job-e") == 20
    assert torch.equal(client.load("job-e")["w"], torch.full((4,), 20.0))
    assert not (server.data_dir / "jobs" / "job-e" / "committed" / f"{30:012d}").exists()
    with pytest.raises(grpc.RpcError) as err:
        client.delete("job-e", 30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_retention_keeps_last_n_and_every_mth(make_server) -> None:
    srv = make_server(None, "--keep-last", "2", "--keep-every", "10")
    with CheckpointClient(srv.address) as client:
        for step in (5, 10, 15, 20, 25, 30, 35):
            client.save("job-f", step, {"w": torch.ones(1)})
            client.commit("job-f", step)
        assert client.list("job-f") == [10, 20, 30, 35]
    kept = sorted(p.name for p in (srv.data_dir / "jobs" / "job-f" / "committed").iterdir())
    assert kept == [f"{s:012d}" for s in (10, 20, 30, 35)]


def test_client_retries_until_the_server_is_up(make_server) -> None:
    late = make_server(start=False)
    starter = threading.Timer(0.5, late.start)
    starter.start()
    try:
        with CheckpointClient(late.address, retries=8, backoff_seconds=0.1) as client:
            assert client.latest("job-g") is None  # UNAVAILABLE at first, retried
    finally:
        starter.join()


def test_client_does_not_retry_other_errors(client: CheckpointClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.load("never-saved")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_one_part_over_many_streams(server, file_holding) -> None:
    tensors = {f"layer{i}": torch.randn(100 + i, 64) for i in range(9)} | {"tiny": torch.zeros(0)}
    with CheckpointClient(server.address, streams=4, chunk_bytes=8 << 10) as many:
        many.save("job-s", 1, tensors, metadata={"loss": 1.5})
        info = many.commit("job-s", 1)
        assert sorted(p.segment for p in info.parts) == [0, 1, 2, 3]
        assert {p.num_segments for p in info.parts} == {4} and info.metadata["loss"] == "1.5"
        assert sum(p.num_tensors for p in info.parts) == len(tensors)
        _assert_bit_exact(many.load("job-s", 1), tensors)
        picked = many.load("job-s", 1, names=["layer3", "tiny"])
        _assert_bit_exact(picked, {k: tensors[k] for k in ("layer3", "tiny")})
    with CheckpointClient(server.address, streams=1) as single:  # any client reads any layout
        _assert_bit_exact(single.load("job-s"), tensors)
        single.save("job-s", 2, tensors)
        assert [p.num_segments for p in single.commit("job-s", 2).parts] == [1]


def test_resave_with_other_stream_count_supersedes_the_first(server) -> None:
    first = {f"t{i}": torch.full((50,), float(i)) for i in range(4)}
    second = {f"t{i}": torch.full((50,), -float(i)) for i in range(4)}
    with CheckpointClient(server.address, streams=4) as four:
        four.save("job-r", 3, first)
    with CheckpointClient(server.address, streams=2) as two:
        two.save("job-r", 3, second)  # a retry split differently: only this attempt counts
        assert [p.num_segments for p in two.commit("job-r", 3).parts] == [2, 2]
        _assert_bit_exact(two.load("job-r", 3), second)


def test_commit_needs_every_segment(client: CheckpointClient, server) -> None:
    header = checkpoint_pb2.SaveHeader(
        job="job-g",
        step=1,
        tensors=[tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.DType.FLOAT32, shape=[2])],
        segment=0,
        num_segments=2,
    )
    data = torch.ones(2).numpy().tobytes()
    chunk = checkpoint_pb2.SaveChunk(tensor_index=0, offset=0, data=data, crc32=zlib.crc32(data))
    stub = checkpoint_pb2_grpc.CheckpointServiceStub(grpc.insecure_channel(server.address))
    stub.Save(iter([checkpoint_pb2.SaveRequest(header=header), checkpoint_pb2.SaveRequest(chunk=chunk)]))
    with pytest.raises(grpc.RpcError) as err:
        client.commit("job-g", 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "segments [0] of 2" in err.value.details()
    assert client.list("job-g") == []
