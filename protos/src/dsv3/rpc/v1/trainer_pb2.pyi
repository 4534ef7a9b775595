from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerStatusResponse(_message.Message):
    __slots__ = ("state", "step", "total", "loss", "tokens_per_second", "has_checkpoint", "last_checkpoint_step", "job", "world_size", "expert_parallel", "data_parallel", "restarts", "message", "last_anomaly", "degraded", "anomalies", "rollbacks", "skipped_steps")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    HAS_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    state: str
    step: int
    total: int
    loss: float
    tokens_per_second: float
    has_checkpoint: bool
    last_checkpoint_step: int
    job: str
    world_size: int
    expert_parallel: int
    data_parallel: int
    restarts: int
    message: str
    last_anomaly: TrainerAnomaly
    degraded: bool
    anomalies: int
    rollbacks: int
    skipped_steps: int
    def __init__(self, state: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., has_checkpoint: _Optional[bool] = ..., last_checkpoint_step: _Optional[int] = ..., job: _Optional[str] = ..., world_size: _Optional[int] = ..., expert_parallel: _Optional[int] = ..., data_parallel: _Optional[int] = ..., restarts: _Optional[int] = ..., message: _Optional[str] = ..., last_anomaly: _Optional[_Union[TrainerAnomaly, _Mapping]] = ..., degraded: _Optional[bool] = ..., anomalies: _Optional[int] = ..., rollbacks: _Optional[int] = ..., skipped_steps: _Optional[int] = ...) -> None: ...

class TrainerAnomaly(_message.Message):
    __slots__ = ("kind", "kinds", "step", "action", "message", "unix_time")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    kinds: _containers.RepeatedScalarFieldContainer[str]
    step: int
    action: str
    message: str
    unix_time: float
    def __init__(self, kind: _Optional[str] = ..., kinds: _Optional[_Iterable[str]] = ..., step: _Optional[int] = ..., action: _Optional[str] = ..., message: _Optional[str] = ..., unix_time: _Optional[float] = ...) -> None: ...
