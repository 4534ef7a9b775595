from dsv3.rpc.v1 import expert_pb2 as _expert_pb2
from dsv3.rpc.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("input_ids",)
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _tensor_pb2.Tensor
    def __init__(self, input_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("logits",)
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "ignore_eos")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    ignore_eos: bool
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "index", "last", "finish_reason", "draft_tokens", "accepted_draft_tokens")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token: int
    index: int
    last: bool
    finish_reason: str
    draft_tokens: int
    accepted_draft_tokens: int
    def __init__(self, token: _Optional[int] = ..., index: _Optional[int] = ..., last: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., draft_tokens: _Optional[int] = ..., accepted_draft_tokens: _Optional[int] = ...) -> None: ...

class PlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("address", "shard_id", "live", "slots", "tokens", "compute_calls")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CALLS_FIELD_NUMBER: _ClassVar[int]
    address: str
    shard_id: str
    live: bool
    slots: _containers.RepeatedCompositeFieldContainer[_expert_pb2.SlotId]
    tokens: int
    compute_calls: int
    def __init__(self, address: _Optional[str] = ..., shard_id: _Optional[str] = ..., live: _Optional[bool] = ..., slots: _Optional[_Iterable[_Union[_expert_pb2.SlotId, _Mapping]]] = ..., tokens: _Optional[int] = ..., compute_calls: _Optional[int] = ...) -> None: ...

class PlacementChange(_message.Message):
    __slots__ = ("version", "reason", "slots_moved", "balancedness_before", "balancedness_after", "seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SLOTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    slots_moved: int
    balancedness_before: float
    balancedness_after: float
    seconds: float
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ..., slots_moved: _Optional[int] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class PlacementResponse(_message.Message):
    __slots__ = ("shards", "balancedness", "replicas", "version", "last_change", "window_balancedness", "rebalances")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    REBALANCES_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    balancedness: float
    replicas: int
    version: int
    last_change: PlacementChange
    window_balancedness: float
    rebalances: int
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., balancedness: _Optional[float] = ..., replicas: _Optional[int] = ..., version: _Optional[int] = ..., last_change: _Optional[_Union[PlacementChange, _Mapping]] = ..., window_balancedness: _Optional[float] = ..., rebalances: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("tolerance",)
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    tolerance: float
    def __init__(self, tolerance: _Optional[float] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("change",)
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    change: PlacementChange
    def __init__(self, change: _Optional[_Union[PlacementChange, _Mapping]] = ...) -> None: ...
