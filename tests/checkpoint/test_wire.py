"""The fast chunk codecs write and read exactly the protobuf wire format, and fall back to protobuf."""

import os
import zlib

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError

from dsv3.checkpoint import wire
from dsv3.checkpoint.client import CheckpointClient
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2

CHUNKS = [
    (0, 0, b"", 0),
    (0, 0, b"x", 1),
    (3, 1 << 20, os.urandom(1000), 0xFFFFFFFF),
    (2**32 - 1, 2**64 - 1, os.urandom(200), 12345),
    (7, 0, os.urandom(300), 0),
]


def _pb_chunk(index: int, offset: int, data: bytes, crc: int) -> bytes:
    chunk = checkpoint_pb2.SaveChunk(tensor_index=index, offset=offset, data=data, crc32=crc)
    return checkpoint_pb2.SaveRequest(chunk=chunk).SerializeToString()


@pytest.mark.parametrize("index,offset,data,crc", CHUNKS)
def test_save_chunk_encoding_is_protobufs(index: int, offset: int, data: bytes, crc: int) -> None:
    assert wire.encode_save_chunk(index, offset, memoryview(data), crc) == _pb_chunk(index, offset, data, crc)


@pytest.mark.parametrize("index,offset,data,crc", CHUNKS)
def test_save_chunk_decoding_reads_protobufs_bytes(index: int, offset: int, data: bytes, crc: int) -> None:
    decoded = wire.deserialize_save_request(_pb_chunk(index, offset, data, crc))
    assert isinstance(decoded, wire.RawChunk)
    assert (decoded.tensor_index, decoded.offset, bytes(decoded.data), decoded.crc32) == (
        index,
        offset,
        data,
        crc,
    )


def test_save_chunk_fields_in_any_order_and_repeated() -> None:
    # crc32 first, data, then tensor_index twice (the last one wins, as in protobuf).
    inner = b"\x20\x05" + b"\x1a\x03abc" + b"\x08\x01" + b"\x08\x02"
    frame = b"\x12" + bytes([len(inner)]) + inner
    decoded = wire.deserialize_save_request(frame)
    reference = checkpoint_pb2.SaveRequest.FromString(frame).chunk
    assert isinstance(decoded, wire.RawChunk)
    assert (decoded.tensor_index, bytes(decoded.data), decoded.crc32) == (
        reference.tensor_index,
        reference.data,
        reference.crc32,
    )


def test_headers_and_unknown_layouts_fall_back_to_protobuf() -> None:
    header = checkpoint_pb2.SaveRequest(
        header=checkpoint_pb2.SaveHeader(
            job="j", step=3, tensors=[tensor_pb2.TensorSpec(name="a", dtype=tensor_pb2.FLOAT32, shape=[2])]
        )
    )
    decoded = wire.deserialize_save_request(header.SerializeToString())
    assert isinstance(decoded, checkpoint_pb2.SaveRequest) and decoded == header
    # An unknown field inside the chunk (a newer client): protobuf keeps the known ones.
    inner = b"\x08\x04" + b"\x1a\x02hi" + b"\x28\x09"
    decoded = wire.deserialize_save_request(b"\x12" + bytes([len(inner)]) + inner)
    assert isinstance(decoded, checkpoint_pb2.SaveRequest)
    assert (decoded.chunk.tensor_index, decoded.chunk.data) == (4, b"hi")


def test_malformed_frames_raise_rather_than_misread() -> None:
    malformed = wire.deserialize_save_request(b"\x12\x09\x1a\x05ab")  # lengths run past the end
    assert isinstance(malformed, wire.Malformed) and "SaveRequest" in malformed.reason
    with pytest.raises(DecodeError, match="LoadResponse"):
        wire.deserialize_load_response(b"\x12\x05ab")


@pytest.mark.parametrize("data", [b"", b"z", os.urandom(70_000)])
def test_load_data_round_trip_and_protobuf_agreement(data: bytes) -> None:
    frame = wire.encode_load_data(memoryview(data))
    assert frame == checkpoint_pb2.LoadResponse(data=data).SerializeToString()
    decoded = wire.deserialize_load_response(frame)
    assert isinstance(decoded, memoryview) and bytes(decoded) == data
    spec = checkpoint_pb2.LoadResponse(
        tensor=tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.INT64, shape=[1])
    )
    assert wire.deserialize_load_response(spec.SerializeToString()) == spec


def test_plain_generated_stub_interoperates_with_the_fast_server(shared_server, shared_client) -> None:
    """Another protobuf client (the generated stub, messages end to end) saves and loads as before."""
    tensor = torch.arange(300_000, dtype=torch.float32)
    data = tensor.numpy().tobytes()
    half = len(data) // 2
    header = checkpoint_pb2.SaveHeader(
        job="plain-stub",
        step=1,
        tensors=[tensor_pb2.TensorSpec(name="t", dtype=tensor_pb2.FLOAT32, shape=[tensor.numel()])],
    )
    chunks = [
        checkpoint_pb2.SaveChunk(tensor_index=0, offset=0, data=data[:half], crc32=zlib.crc32(data[:half])),
        checkpoint_pb2.SaveChunk(tensor_index=0, offset=half, data=data[half:], crc32=zlib.crc32(data)),
    ]
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = checkpoint_pb2_grpc.CheckpointServiceStub(channel)
        requests = [checkpoint_pb2.SaveRequest(header=header)] + [
            checkpoint_pb2.SaveRequest(chunk=c) for c in chunks
        ]
        assert stub.Save(iter(requests), timeout=30).bytes_written > len(data)
        stub.Commit(checkpoint_pb2.CommitRequest(job="plain-stub", step=1, num_parts=1), timeout=30)
        responses = list(stub.Load(checkpoint_pb2.LoadRequest(job="plain-stub", step=1), timeout=30))
    assert responses[0].WhichOneof("kind") == "tensor" and responses[0].tensor.name == "t"
    assert b"".join(r.data for r in responses[1:]) == data
    # ...and the fast client reads what the plain stub wrote.
    assert torch.equal(shared_client.load("plain-stub", 1)["t"], tensor)


def test_fast_client_with_tiny_chunks_round_trips(shared_server) -> None:
    tensors = {"a": torch.randn(1000), "b": torch.randint(0, 9, (333,), dtype=torch.int64)}
    with CheckpointClient(shared_server.address, chunk_bytes=777, streams=2) as client:
        client.save("tiny-chunks", 1, tensors)
        client.commit("tiny-chunks", 1)
        loaded = client.load("tiny-chunks", 1)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("first_is_header", [True, False])
def test_undecodable_save_bytes_are_invalid_argument(
    shared_server, shared_client, first_is_header: bool
) -> None:
    header = checkpoint_pb2.SaveRequest(
        header=checkpoint_pb2.SaveHeader(
            job="garbled",
            step=1,
            tensors=[tensor_pb2.TensorSpec(name="a", dtype=tensor_pb2.UINT8, shape=[2])],
        )
    )
    frames = [header.SerializeToString(), b"\x12\x09\x1a\x05ab"] if first_is_header else [b"\xff\xff\xff"]
    with grpc.insecure_channel(shared_server.address) as channel:
        save = channel.stream_unary("/dsv3.rpc.v1.CheckpointService/Save")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as err:
            save(iter(frames), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "undecodable SaveRequest" in err.value.details()
    assert shared_client.list("garbled") == []
