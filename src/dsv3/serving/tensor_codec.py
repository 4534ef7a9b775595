"""torch.Tensor <-> `dsv3.rpc.v1.Tensor`: dtype + shape + raw little-endian bytes.

Every service moves tensors through this codec, so dtype names, the safetensors names used on disk
and size checks live in one place. Decoding refuses a byte count that does not match dtype x shape.
"""

from __future__ import annotations

import sys

import torch

from dsv3.rpc.v1 import tensor_pb2

if sys.byteorder != "little":  # raw tensor bytes are little-endian on the wire and on disk
    raise ImportError("dsv3.serving.tensor_codec needs a little-endian machine")

DType = tensor_pb2.DType

# wire dtype <-> (torch dtype, safetensors dtype name)
_TABLE: dict[int, tuple[torch.dtype, str]] = {
    DType.BFLOAT16: (torch.bfloat16, "BF16"),
    DType.FLOAT16: (torch.float16, "F16"),
    DType.FLOAT32: (torch.float32, "F32"),
    DType.FLOAT64: (torch.float64, "F64"),
    DType.FLOAT8_E4M3FN: (torch.float8_e4m3fn, "F8_E4M3"),
    DType.FLOAT8_E5M2: (torch.float8_e5m2, "F8_E5M2"),
    DType.INT32: (torch.int32, "I32"),
    DType.INT64: (torch.int64, "I64"),
    DType.UINT8: (torch.uint8, "U8"),
    DType.BOOL: (torch.bool, "BOOL"),
}
_FROM_TORCH = {torch_dtype: wire for wire, (torch_dtype, _) in _TABLE.items()}
_FROM_SAFETENSORS = {name: wire for wire, (_, name) in _TABLE.items()}


class TensorCodecError(ValueError):
    """A tensor message or spec is malformed (unknown dtype, negative dim, byte-count mismatch)."""


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise TensorCodecError(
            f"dtype {dtype} cannot be sent (supported: {sorted(map(str, _FROM_TORCH))})"
        ) from None


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _TABLE[wire][0]
    except KeyError:
        raise TensorCodecError(f"unknown or unspecified dtype {wire}") from None


def safetensors_dtype(wire: int) -> str:
    torch_dtype(wire)
    return _TABLE[wire][1]


def wire_dtype_from_safetensors(name: str) -> int:
    try:
        return _FROM_SAFETENSORS[name]
    except KeyError:
        raise TensorCodecError(f"unsupported safetensors dtype {name!r}") from None


def nbytes(wire: int, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes of a tensor of this dtype and shape; refuses negative dimensions."""
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"negative dimension in shape {list(shape)}")
    count = 1
    for d in shape:
        count *= d
    return count * torch_dtype(wire).itemsize


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is already a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def from_bytes(
    data: bytes | bytearray | memoryview, wire: int, shape: list[int] | tuple[int, ...]
) -> torch.Tensor:
    expected = nbytes(wire, shape)
    if len(data) != expected:
        raise TensorCodecError(
            f"{len(data)} bytes for dtype {DType.Name(wire)} shape {list(shape)}: expected {expected}"
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype(wire))
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(torch_dtype(wire)).reshape(tuple(shape))


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=wire_dtype(tensor.dtype), shape=list(tensor.shape), data=bytes(byte_view(tensor))
    )


def decode(message: tensor_pb2.Tensor) -> torch.Tensor:
    return from_bytes(message.data, message.dtype, list(message.shape))
