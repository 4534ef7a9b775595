"""Bad requests get INVALID_ARGUMENT / NOT_FOUND with nothing written; faults get clear statuses."""

import errno
import uuid
import zlib
from pathlib import Path

import grpc
import pytest
import torch

from dsv3.checkpoint import CheckpointClient
from dsv3.checkpoint.service import status_for
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2

F32 = tensor_pb2.DType.FLOAT32


def _files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "jobs").rglob("*") if p.is_file()}


def _raw_save(
    address: str, header: checkpoint_pb2.SaveHeader, chunks: list[checkpoint_pb2.SaveChunk]
) -> None:
    requests = [checkpoint_pb2.SaveRequest(header=header)] + [
        checkpoint_pb2.SaveRequest(chunk=c) for c in chunks
    ]
    with grpc.insecure_channel(address) as channel:
        checkpoint_pb2_grpc.CheckpointServiceStub(channel).Save(iter(requests), timeout=30)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _spec(name: str = "w", dtype: int = F32, shape: tuple[int, ...] = (4,)) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, dtype=dtype, shape=list(shape))


def _chunk(data: bytes, offset: int = 0, index: int = 0, crc: int | None = None) -> checkpoint_pb2.SaveChunk:
    return checkpoint_pb2.SaveChunk(
        tensor_index=index, offset=offset, data=data, crc32=zlib.crc32(data) if crc is None else crc
    )


@pytest.mark.parametrize(
    "job", ["../escape", "a/b", "a\x00b", "..", ".hidden", "", "x" * 200, "a\\b", "job\n", "\njob"]
)
def test_path_tricks_in_job_ids(shared_client: CheckpointClient, shared_server, job: str) -> None:
    before = _files(shared_server.data_dir)
    assert _code(lambda: shared_client.save(job, 1, {"w": torch.ones(2)})) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: shared_client.commit(job, 1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: shared_client.load(job)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(shared_server.data_dir) == before


@pytest.mark.parametrize("name", ["../w", "a/b", "a\x00", "", "x..y", "__metadata__"])
def test_bad_tensor_names(shared_client: CheckpointClient, shared_server, name: str) -> None:
    before = _files(shared_server.data_dir)
    code = _code(lambda: shared_client.save("names", 1, {name: torch.ones(2)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(shared_server.data_dir) == before


def test_negative_step_and_bad_part_count(shared_client: CheckpointClient, shared_server) -> None:
    before = _files(shared_server.data_dir)
    one = {"w": torch.ones(2)}
    assert _code(lambda: shared_client.save("steps", -1, one)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: shared_client.save("steps", 1, one, part=-2)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: shared_client.commit("steps", 1, num_parts=0)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(shared_server.data_dir) == before


@pytest.mark.parametrize(
    ("spec", "chunks"),
    [
        (_spec(shape=(4,)), [_chunk(b"\0" * 20)]),  # more bytes than dtype x shape
        (_spec(shape=(4,)), [_chunk(b"\0" * 12)]),  # fewer bytes than dtype x shape
        (_spec(dtype=tensor_pb2.DType.DTYPE_UNSPECIFIED), [_chunk(b"\0" * 16)]),  # no dtype
        (_spec(dtype=99), [_chunk(b"\0" * 16)]),  # unknown dtype
        (_spec(shape=(-4,)), []),  # negative dimension
        (_spec(shape=(4,)), [_chunk(b"\0" * 8), _chunk(b"\0" * 8, offset=4)]),  # overlapping offsets
        (_spec(shape=(4,)), [_chunk(b"\0" * 16, index=3)]),  # tensor index out of range
        (_spec(shape=(4,)), [_chunk(b"\0" * 16, crc=123)]),  # checksum mismatch
    ],
)
def test_malformed_streams(shared_server, spec, chunks) -> None:
    before = _files(shared_server.data_dir)
    header = checkpoint_pb2.SaveHeader(job="raw", step=1, tensors=[spec])
    assert _code(lambda: _raw_save(shared_server.address, header, chunks)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(shared_server.data_dir) == before


def test_duplicate_names_and_missing_header(shared_server) -> None:
    before = _files(shared_server.data_dir)
    header = checkpoint_pb2.SaveHeader(job="raw", step=1, tensors=[_spec(), _spec()])
    assert _code(lambda: _raw_save(shared_server.address, header, [])) == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = checkpoint_pb2_grpc.CheckpointServiceStub(channel)
        only_chunk = iter([checkpoint_pb2.SaveRequest(chunk=_chunk(b"\0" * 16))])
        assert _code(lambda: stub.Save(only_chunk, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(shared_server.data_dir) == before


def test_oversize_chunk(make_server) -> None:
    srv = make_server(None, "--max-chunk-bytes", str(1 << 20))
    header = checkpoint_pb2.SaveHeader(
        job="raw", step=1, tensors=[_spec(dtype=tensor_pb2.DType.UINT8, shape=((1 << 20) + 1,))]
    )
    too_big = _chunk(b"\1" * ((1 << 20) + 1))
    assert _code(lambda: _raw_save(srv.address, header, [too_big])) == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(srv.data_dir) == set()


def test_unknown_job_or_step(shared_client: CheckpointClient) -> None:
    assert _code(lambda: shared_client.load("nobody")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: shared_client.load("nobody", 4)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: shared_client.commit("nobody", 4)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: shared_client.delete("nobody", 4)) == grpc.StatusCode.NOT_FOUND
    assert shared_client.latest("nobody") is None and shared_client.list("nobody") == []


def test_flipped_byte_is_data_loss_and_other_checkpoints_load(
    client: CheckpointClient, server, file_holding
) -> None:
    good = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    client.save("job", 1, good)
    client.commit("job", 1)
    client.save("job", 2, good)
    client.commit("job", 2)
    part = file_holding(server.data_dir / "jobs" / "job" / "committed" / f"{2:012d}", "b")
    raw = bytearray(part.read_bytes())
    raw[-100] ^= 0x01  # inside tensor "b"
    part.write_bytes(bytes(raw))
    with pytest.raises(grpc.RpcError) as err:
        client.load("job", 2)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert part.name in err.value.details() and "'b'" not in err.value.details()
    assert "b" in err.value.details()
    assert torch.equal(client.load("job", 2, names=["a"])["a"], good["a"])  # intact tensor still verifies
    loaded = client.load("job", 1)
    assert all(torch.equal(loaded[k], good[k]) for k in good)


def test_quota_exhausted_keeps_committed_data(make_server) -> None:
    srv = make_server(None, "--quota-bytes", str(200_000))
    with CheckpointClient(srv.address) as client:
        first = {"w": torch.randn(20_000)}  # 80 kB
        client.save("job", 1, first)
        client.commit("job", 1)
        with pytest.raises(grpc.RpcError) as err:
            client.save("job", 2, {"w": torch.randn(40_000)})  # would exceed the quota
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in err.value.details()
        assert client.list("job") == [1]
        assert torch.equal(client.load("job", 1)["w"], first["w"])
    assert not (srv.data_dir / "jobs" / "job" / "pending" / "2").exists() or not any(
        (srv.data_dir / "jobs" / "job" / "pending" / "2").iterdir()
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_maps_to_resource_exhausted() -> None:
    with pytest.raises(OSError) as err, open("/dev/full", "wb") as full:  # a real ENOSPC from the kernel
        full.write(b"x")
        full.flush()
    assert err.value.errno == errno.ENOSPC
    code, message = status_for(err.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left" in message
    code, message = status_for(OSError(errno.EROFS, "Read-only file system"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "read-only" in message


def test_bad_segment_and_shard_numbers(shared_client: CheckpointClient, server) -> None:
    stub = checkpoint_pb2_grpc.CheckpointServiceStub(grpc.insecure_channel(server.address))
    for segment, count in [(2, 2), (0, 65)]:
        header = checkpoint_pb2.SaveHeader(job="seg", step=1, segment=segment, num_segments=count)
        with pytest.raises(grpc.RpcError) as err:
            stub.Save(iter([checkpoint_pb2.SaveRequest(header=header)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_segments" in err.value.details()
    job = f"seg-{uuid.uuid4().hex[:8]}"  # the server is shared with other tests
    shared_client.save(job, 1, {"x": torch.ones(1)})
    shared_client.commit(job, 1)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Load(checkpoint_pb2.LoadRequest(job=job, step=1, shard=3, num_shards=3)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_shards" in err.value.details()


def test_flipped_header_byte_or_missing_file_is_data_loss(
    shared_client: CheckpointClient, shared_server, file_holding
) -> None:
    tensors = {f"t{i}": torch.randn(32) for i in range(6)}  # part files holding several tensors each
    shared_client.save("hdr", 1, tensors)
    shared_client.commit("hdr", 1)
    directory = shared_server.data_dir / "jobs" / "hdr" / "committed" / f"{1:012d}"
    part = file_holding(directory, "t3")
    raw = bytearray(part.read_bytes())
    raw[12] ^= 0x01  # inside the safetensors JSON header
    part.write_bytes(bytes(raw))
    with pytest.raises(grpc.RpcError) as err:
        shared_client.load("hdr", 1, names=["t3"])
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert f"{part.name}: header checksum mismatch" in err.value.details()
    part.unlink()
    with pytest.raises(grpc.RpcError) as err:
        shared_client.load("hdr", 1)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert f"{part.name} is missing" in err.value.details()


def test_long_job_ids_are_not_echoed(shared_client: CheckpointClient) -> None:
    job = "j" * 1_000_000
    for call in (lambda: shared_client.latest(job), lambda: shared_client.commit(job, 1)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(err.value.details()) < 300 and "1000000 characters" in err.value.details()


@pytest.mark.parametrize("method", ["List", "Latest", "Commit", "Delete", "Load"])
def test_invalid_utf8_is_invalid_argument(shared_server, raw_client, method: str) -> None:
    raw = raw_client(shared_server.address)
    request = {
        "List": checkpoint_pb2.ListRequest(job="ab"),
        "Latest": checkpoint_pb2.LatestRequest(job="ab"),
        "Commit": checkpoint_pb2.CommitRequest(job="ab", step=1, num_parts=1),
        "Delete": checkpoint_pb2.DeleteRequest(job="ab", step=1),
        "Load": checkpoint_pb2.LoadRequest(job="ab", step=1),
    }[method]
    payload = request.SerializeToString().replace(b"ab", b"\xff\xfe")
    if method == "Load":
        call = raw.channel.unary_stream(
            "/dsv3.rpc.v1.CheckpointService/Load", request_serializer=bytes, response_deserializer=bytes
        )
        code = _code(lambda: list(call(payload, timeout=10)))
    else:
        code = _code(lambda: raw.unary(method, payload))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_chunk_for_a_tensor_past_the_header(shared_server) -> None:
    before = _files(shared_server.data_dir)
    header = checkpoint_pb2.SaveHeader(job="raw", step=1, tensors=[_spec()])
    chunks = [_chunk(b"\0" * 16), _chunk(b"\0" * 4, index=1)]
    code = _code(lambda: _raw_save(shared_server.address, header, chunks))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _files(shared_server.data_dir) == before


def test_same_tensor_name_in_two_parts_is_refused_at_commit(shared_client: CheckpointClient) -> None:
    shared_client.save("dup", 1, {"w": torch.ones(2), "a": torch.ones(1)}, part=0)
    shared_client.save("dup", 1, {"w": torch.zeros(2)}, part=1)
    with pytest.raises(grpc.RpcError) as err:
        shared_client.commit("dup", 1, num_parts=2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'w'" in err.value.details()
    assert shared_client.list("dup") == []


@pytest.mark.parametrize("index", ["embedded", "redis"])
def test_a_step_without_its_manifest_can_be_deleted_and_saved_again(
    make_server, redis_server, tmp_path, index: str
) -> None:
    redis_url = redis_server.url if index == "redis" else None
    data_dir = tmp_path / "nomani"
    srv = make_server(redis_url, data_dir=data_dir)
    with CheckpointClient(srv.address) as client:
        client.save("nomani", 1, {"w": torch.ones(4)})
        client.commit("nomani", 1)
    (data_dir / "jobs" / "nomani" / "committed" / f"{1:012d}" / "manifest.json").unlink()
    srv.stop()
    srv = make_server(redis_url, data_dir=data_dir)  # recovery cannot index it: only the bytes are left
    with CheckpointClient(srv.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.save("nomani", 1, {"w": torch.zeros(4)})
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.delete("nomani", 1)
        client.save("nomani", 1, {"w": torch.zeros(4)})
        client.commit("nomani", 1)
        assert torch.equal(client.load("nomani", 1)["w"], torch.zeros(4))


def test_bytes_appended_to_a_part_file_are_data_loss(client: CheckpointClient, server, file_holding) -> None:
    client.save("append", 1, {"w": torch.randn(256)})
    client.commit("append", 1)
    part = file_holding(server.data_dir / "jobs" / "append" / "committed" / f"{1:012d}", "w")
    with open(part, "ab") as handle:
        handle.write(b"extra")
    with pytest.raises(grpc.RpcError) as err:
        client.load("append", 1)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and part.name in err.value.details()


def test_delete_discards_uncommitted_parts(shared_client: CheckpointClient, shared_server) -> None:
    shared_client.save("discard", 3, {"w": torch.ones(4)})
    shared_client.delete("discard", 3)
    assert not (shared_server.data_dir / "jobs" / "discard" / "pending" / "3").exists()
    assert _code(lambda: shared_client.commit("discard", 3)) == grpc.StatusCode.NOT_FOUND
