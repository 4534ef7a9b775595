"""The wire codec for tensors: every supported dtype round-trips bit-exactly; bad sizes are refused."""

import pytest
import torch

from dsv3.rpc.v1 import tensor_pb2
from dsv3.serving import dtypes, tensor_codec

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(dtype: torch.dtype) -> None:
    source = (torch.randn(5, 3) * 50).to(dtype)
    message = tensor_codec.encode(source)
    assert len(message.data) == source.numel() * source.element_size()
    back = tensor_codec.decode(tensor_pb2.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back.view(torch.uint8), source.view(torch.uint8))


def test_non_contiguous_and_empty() -> None:
    source = torch.arange(12.0).reshape(3, 4).T
    assert torch.equal(tensor_codec.decode(tensor_codec.encode(source)), source)
    empty = tensor_codec.decode(tensor_codec.encode(torch.empty(0, 7)))
    assert empty.shape == (0, 7)


def test_refuses_mismatches() -> None:
    with pytest.raises(tensor_codec.TensorCodecError, match="expected 16"):
        tensor_codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.DType.FLOAT32, shape=[4], data=b"\0" * 15))
    with pytest.raises(tensor_codec.TensorCodecError, match="unknown or unspecified dtype"):
        tensor_codec.decode(tensor_pb2.Tensor(shape=[1], data=b"\0"))
    with pytest.raises(tensor_codec.TensorCodecError, match="negative dimension"):
        tensor_codec.nbytes(tensor_pb2.DType.INT32, [2, -1])
    with pytest.raises(tensor_codec.TensorCodecError, match="cannot be sent"):
        tensor_codec.encode(torch.zeros(2, dtype=torch.complex64))


def test_safetensors_names() -> None:
    assert tensor_codec.safetensors_dtype(tensor_pb2.DType.FLOAT8_E4M3FN) == "F8_E4M3"
    assert tensor_codec.wire_dtype_from_safetensors("BF16") == tensor_pb2.DType.BFLOAT16
    with pytest.raises(tensor_codec.TensorCodecError):
        tensor_codec.wire_dtype_from_safetensors("C64")


def test_torch_free_dtype_table_matches_torch() -> None:
    """`dtypes` (used by the torch-free checkpoint server) and the torch side agree on every dtype."""
    assert {tensor_codec.wire_dtype(d) for d in DTYPES} == set(dtypes.SUPPORTED)
    for dtype in DTYPES:
        wire = tensor_codec.wire_dtype(dtype)
        assert tensor_codec.torch_dtype(wire) == dtype
        assert dtypes.itemsize(wire) == dtype.itemsize
        assert dtypes.nbytes(wire, (3, 5)) == torch.empty(3, 5, dtype=dtype).nbytes
    with pytest.raises(dtypes.TensorCodecError, match="negative dimension"):
        dtypes.nbytes(tensor_pb2.DType.FLOAT32, (2, -1))
    with pytest.raises(dtypes.TensorCodecError, match="unsupported safetensors dtype"):
        dtypes.wire_dtype_from_safetensors("F4")
