"""Settings of the operator process; each is a `DSV3_OPERATOR_*` environment variable (set by the chart)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    checkpoint_address: str = ""  # default dsv3-checkpoint host:port for jobs that name none
    redis_url: str = ""  # default shard registry for serving jobs
    gpu_resource: str = "nvidia.com/gpu"  # GPU resource name for jobs whose spec names none
    otel_endpoint: str = ""  # OTEL_EXPORTER_OTLP_ENDPOINT handed to every pod ('' = none)
    resync_seconds: float = 10.0  # how often a job's pods and trainer status are re-read
    rdzv_port: int = 29400
    status_port: int = 50060
    status_timeout_seconds: float = 2.0
    cluster_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0:
            raise ValueError(f"resync_seconds must be > 0, got {self.resync_seconds}")
        for name in ("rdzv_port", "status_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [1, 65535], got {getattr(self, name)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        kw: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"DSV3_OPERATOR_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(f.default)
            try:
                kw[f.name] = kind(raw)
            except ValueError as e:
                raise ValueError(
                    f"DSV3_OPERATOR_{f.name.upper()}: cannot read {raw!r} as {kind.__name__}"
                ) from e
        return cls(**kw)  # type: ignore[arg-type]
