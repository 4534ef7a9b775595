"""Wire dtypes of `dsv3.rpc.v1.Tensor`: their safetensors names, element sizes and byte counts.

Kept free of torch so that services which only move bytes (the checkpoint server) do not pay the
~200 MiB of resident memory that importing torch costs; `tensor_codec` adds the torch side.
"""

from __future__ import annotations

import math

from dsv3.rpc.v1 import tensor_pb2

DType = tensor_pb2.DType

# wire dtype -> (safetensors dtype name, bytes per element, torch dtype attribute name)
_TABLE: dict[int, tuple[str, int, str]] = {
    DType.BFLOAT16: ("BF16", 2, "bfloat16"),
    DType.FLOAT16: ("F16", 2, "float16"),
    DType.FLOAT32: ("F32", 4, "float32"),
    DType.FLOAT64: ("F64", 8, "float64"),
    DType.FLOAT8_E4M3FN: ("F8_E4M3", 1, "float8_e4m3fn"),
    DType.FLOAT8_E5M2: ("F8_E5M2", 1, "float8_e5m2"),
    DType.INT32: ("I32", 4, "int32"),
    DType.INT64: ("I64", 8, "int64"),
    DType.UINT8: ("U8", 1, "uint8"),
    DType.BOOL: ("BOOL", 1, "bool"),
}
_FROM_SAFETENSORS = {name: wire for wire, (name, _, _) in _TABLE.items()}

SUPPORTED = tuple(_TABLE)


class TensorCodecError(ValueError):
    """A tensor message or spec is malformed (unknown dtype, negative dim, byte-count mismatch)."""


def _entry(wire: int) -> tuple[str, int, str]:
    try:
        return _TABLE[wire]
    except KeyError:
        raise TensorCodecError(f"unknown or unspecified dtype {wire}") from None


def itemsize(wire: int) -> int:
    return _entry(wire)[1]


def safetensors_dtype(wire: int) -> str:
    return _entry(wire)[0]


def torch_name(wire: int) -> str:
    """The `torch` attribute naming this dtype (`tensor_codec` turns it into a torch.dtype)."""
    return _entry(wire)[2]


def wire_dtype_from_safetensors(name: str) -> int:
    try:
        return _FROM_SAFETENSORS[name]
    except KeyError:
        raise TensorCodecError(f"unsupported safetensors dtype {name!r}") from None


def nbytes(wire: int, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes of a tensor of this dtype and shape; refuses negative dimensions."""
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"negative dimension in shape {list(shape)}")
    return math.prod(shape) * itemsize(wire)
