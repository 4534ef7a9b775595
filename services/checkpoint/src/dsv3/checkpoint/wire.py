"""Fast protobuf wire codecs for the two checkpoint messages that carry tensor bytes.

Why: building a `SaveChunk` / `LoadResponse` message and serializing it copies a chunk's payload
twice, and parsing it on the other side twice more; in Python gRPC those copies, not the socket, cap a
stream at about a third of what it carries with raw bytes. These codecs write and read the same
protobuf wire format directly: one copy on the sending side (the frame is joined straight from the
tensor's or the read buffer's memory), none on the receiving side (the payload is a `memoryview` into
the received message). Anything that is not a plain data chunk (headers, tensor specs, a frame laid out
in an order these readers do not expect) goes through the generated protobuf classes, so any other
protobuf client or server stays compatible.

Wire facts used (protobuf encoding): a field's tag is the varint `number << 3 | wire_type`; wire type 0
is a varint, 2 is length-delimited (varint length, then the bytes). proto3 omits zero scalars.
`SaveRequest.chunk` is field 2 holding `SaveChunk{tensor_index=1, offset=2, data=3, crc32=4}`;
`LoadResponse.data` is field 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError

from dsv3.rpc.v1 import checkpoint_pb2

_LEN = 2  # wire type: length-delimited
_VARINT = 0
_SAVE_REQUEST_CHUNK_TAG = 2 << 3 | _LEN
_LOAD_RESPONSE_DATA_TAG = 2 << 3 | _LEN
_UINT32_LIMIT = 1 << 32
_UINT64_LIMIT = 1 << 64
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RawChunk:
    """A decoded `SaveChunk` whose `data` is a view into the received message (no copy)."""

    tensor_index: int
    offset: int
    data: memoryview
    crc32: int


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A request that is not valid protobuf; the servicer answers INVALID_ARGUMENT with `reason`."""

    reason: str


class _Unexpected(Exception):
    """The frame is valid protobuf perhaps, but not the layout the fast path reads."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return bytes([number << 3 | wire_type])  # field numbers here are < 16: one byte


def _scalar(number: int, value: int) -> bytes:
    """A varint field as proto3 writes it: omitted when zero."""
    return _tag(number, _VARINT) + _varint(value) if value else b""


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf) and shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Unexpected("truncated or overlong varint")


def _read_length(buf: memoryview, pos: int) -> tuple[int, int]:
    length, pos = _read_varint(buf, pos)
    if pos + length > len(buf):
        raise _Unexpected("length-delimited field runs past the frame")
    return length, pos


# ---- SaveRequest (client -> server) ----------------------------------------------------------------
def encode_save_chunk(tensor_index: int, offset: int, data: memoryview | bytes, crc32: int) -> bytes:
    """Serialized `SaveRequest(chunk=SaveChunk(...))`, byte-identical to what protobuf writes."""
    size = len(data)
    head = _scalar(1, tensor_index) + _scalar(2, offset) + (_tag(3, _LEN) + _varint(size) if size else b"")
    tail = _scalar(4, crc32)
    inner = len(head) + size + len(tail)
    return b"".join((bytes([_SAVE_REQUEST_CHUNK_TAG]), _varint(inner), head, data, tail))


def serialize_save_request(message: bytes | checkpoint_pb2.SaveRequest) -> bytes:
    """gRPC request serializer: pre-encoded chunk frames pass through, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _decode_chunk(frame: memoryview) -> RawChunk:
    if len(frame) == 0 or frame[0] != _SAVE_REQUEST_CHUNK_TAG:
        raise _Unexpected("not a chunk")
    length, pos = _read_length(frame, 1)
    if pos + length != len(frame):
        raise _Unexpected("trailing fields after the chunk")
    tensor_index = offset = crc32 = 0
    data = frame[pos:pos]
    while pos < len(frame):
        tag, pos = _read_varint(frame, pos)
        if tag == 3 << 3 | _LEN:
            size, pos = _read_length(frame, pos)
            data, pos = frame[pos : pos + size], pos + size
            continue
        if tag & 7 != _VARINT:
            raise _Unexpected(f"field tag {tag}")
        value, pos = _read_varint(frame, pos)
        if tag == 1 << 3 | _VARINT and value < _UINT32_LIMIT:
            tensor_index = value
        elif tag == 2 << 3 | _VARINT and value < _UINT64_LIMIT:
            offset = value
        elif tag == 4 << 3 | _VARINT and value < _UINT32_LIMIT:
            crc32 = value
        else:
            raise _Unexpected(f"field tag {tag}")
    return RawChunk(tensor_index, offset, data, crc32)


def deserialize_save_request(frame: bytes) -> RawChunk | checkpoint_pb2.SaveRequest | Malformed:
    """gRPC request deserializer: data chunks as `RawChunk`, everything else as a `SaveRequest`.

    Undecodable bytes come back as `Malformed` rather than raising, which gRPC would report as an
    internal error instead of the client's mistake.
    """
    try:
        return _decode_chunk(memoryview(frame))
    except _Unexpected:
        try:
            return checkpoint_pb2.SaveRequest.FromString(frame)
        except DecodeError as exc:
            return Malformed(f"undecodable SaveRequest ({len(frame)} bytes): {exc}")


# ---- LoadResponse (server -> client) ---------------------------------------------------------------
def encode_load_data(data: memoryview | bytes) -> bytes:
    """Serialized `LoadResponse(data=...)`: one copy of the payload, from wherever it lies."""
    return b"".join((bytes([_LOAD_RESPONSE_DATA_TAG]), _varint(len(data)), data))


def serialize_load_response(message: bytes | checkpoint_pb2.LoadResponse) -> bytes:
    """gRPC response serializer: pre-encoded data frames pass through, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def deserialize_load_response(frame: bytes) -> memoryview | checkpoint_pb2.LoadResponse:
    """gRPC response deserializer: a data frame's payload as a view, anything else as a `LoadResponse`."""
    view = memoryview(frame)
    try:
        if len(view) and view[0] == _LOAD_RESPONSE_DATA_TAG:
            length, pos = _read_length(view, 1)
            if pos + length == len(view):
                return view[pos:]
    except _Unexpected:
        view.release()
    return checkpoint_pb2.LoadResponse.FromString(frame)


# ---- unary requests ----------------------------------------------------------------------------------
def lenient(message_type: type[T]) -> Callable[[bytes], T | Malformed]:
    """A request deserializer that hands undecodable bytes (e.g. invalid UTF-8) over as `Malformed`.

    gRPC answers a deserializer's exception with UNKNOWN/INTERNAL; the servicer says INVALID_ARGUMENT.
    """

    def parse(frame: bytes) -> T | Malformed:
        try:
            return message_type.FromString(frame)  # type: ignore[attr-defined]
        except DecodeError:
            return Malformed(
                f"undecodable {message_type.__name__} ({len(frame)} bytes; strings must be UTF-8)"
            )

    return parse
