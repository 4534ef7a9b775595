"""torch.Tensor <-> `dsv3.rpc.v1.Tensor`: dtype + shape + raw little-endian bytes.

Every service that holds torch tensors moves them through this codec. The torch-free half (wire
dtypes, safetensors names, byte counts) is `dsv3.serving.dtypes`, re-exported here. Decoding refuses a
byte count that does not match dtype x shape.
"""

from __future__ import annotations

import sys

import torch

from dsv3.rpc.v1 import tensor_pb2
from dsv3.serving import dtypes
from dsv3.serving.dtypes import (
    DType,
    TensorCodecError,
    nbytes,
    safetensors_dtype,
    wire_dtype_from_safetensors,
)

if sys.byteorder != "little":  # raw tensor bytes are little-endian on the wire and on disk
    raise ImportError("dsv3.serving.tensor_codec needs a little-endian machine")

__all__ = [
    "DType",
    "TensorCodecError",
    "byte_view",
    "decode",
    "encode",
    "from_bytes",
    "nbytes",
    "safetensors_dtype",
    "torch_dtype",
    "wire_dtype",
    "wire_dtype_from_safetensors",
]

_FROM_TORCH: dict[torch.dtype, int] = {getattr(torch, dtypes.torch_name(w)): w for w in dtypes.SUPPORTED}


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise TensorCodecError(
            f"dtype {dtype} cannot be sent (supported: {sorted(map(str, _FROM_TORCH))})"
        ) from None


def torch_dtype(wire: int) -> torch.dtype:
    return getattr(torch, dtypes.torch_name(wire))  # torch_name refuses unknown dtypes


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
