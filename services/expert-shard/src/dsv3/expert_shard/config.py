"""Settings of an expert shard; every field is a flag and a `DSV3_*` environment variable."""

from __future__ import annotations

import dataclasses
import socket


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    port: int = 50080
    host: str = "0.0.0.0"
    capacity: int = 256  # (layer, expert) slots this shard may hold
    device: str = ""  # cpu | cuda; empty: cuda when present
    shard_id: str = ""  # empty: the hostname (stable under a StatefulSet)
    redis_url: str | None = None  # announce this shard in the registry (with a TTL) when set
    advertise_address: str = ""  # what the registry says; empty: <hostname>:<port>
    registry_ttl_seconds: float = 6.0
    checkpoint: str | None = None  # address of the checkpoint service, for CheckpointSource loads
    max_message_bytes: int = 256 << 20
    metrics_port: int = 0  # Prometheus /metrics (rows computed per layer, compute time); 0: none
    grace_seconds: float = 5.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {self.capacity}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.registry_ttl_seconds <= 0:
            raise ValueError("registry_ttl_seconds must be > 0")
        if not self.device:
            object.__setattr__(self, "device", _default_device())
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if not self.shard_id:
            object.__setattr__(self, "shard_id", socket.gethostname())
        for name in ("redis_url", "checkpoint"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
