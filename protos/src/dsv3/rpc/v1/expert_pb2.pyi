from dsv3.rpc.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotId(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("layer", "experts", "counts", "rows", "row_weights")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    rows: _tensor_pb2.Tensor
    row_weights: _tensor_pb2.Tensor
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., rows: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., row_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("rows", "error")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    rows: _tensor_pb2.Tensor
    error: ComputeError
    def __init__(self, rows: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[ComputeError, _Mapping]] = ...) -> None: ...

class ComputeError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HfDirectorySource(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class CheckpointSource(_message.Message):
    __slots__ = ("job", "step", "latest")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    latest: bool
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., latest: _Optional[bool] = ...) -> None: ...

class LoadSlotsRequest(_message.Message):
    __slots__ = ("slots", "hf_directory", "checkpoint", "hidden_size", "moe_intermediate_size", "dtype")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    HF_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MOE_INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotId]
    hf_directory: HfDirectorySource
    checkpoint: CheckpointSource
    hidden_size: int
    moe_intermediate_size: int
    dtype: _tensor_pb2.DType
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotId, _Mapping]]] = ..., hf_directory: _Optional[_Union[HfDirectorySource, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSource, _Mapping]] = ..., hidden_size: _Optional[int] = ..., moe_intermediate_size: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class LoadSlotsResponse(_message.Message):
    __slots__ = ("loaded",)
    LOADED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedCompositeFieldContainer[SlotId]
    def __init__(self, loaded: _Optional[_Iterable[_Union[SlotId, _Mapping]]] = ...) -> None: ...

class DropSlotsRequest(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotId]
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotId, _Mapping]]] = ...) -> None: ...

class DropSlotsResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: _containers.RepeatedCompositeFieldContainer[SlotId]
    def __init__(self, dropped: _Optional[_Iterable[_Union[SlotId, _Mapping]]] = ...) -> None: ...

class ShardStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SlotStatus(_message.Message):
    __slots__ = ("slot", "tokens")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    slot: SlotId
    tokens: int
    def __init__(self, slot: _Optional[_Union[SlotId, _Mapping]] = ..., tokens: _Optional[int] = ...) -> None: ...

class ShardStatusResponse(_message.Message):
    __slots__ = ("shard_id", "capacity", "slots")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    capacity: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotStatus]
    def __init__(self, shard_id: _Optional[str] = ..., capacity: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotStatus, _Mapping]]] = ...) -> None: ...
