"""Settings of the checkpoint service; every field is a flag and a `DSV3_*` environment variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    data_dir: Path
    port: int = 50070
    host: str = "0.0.0.0"
    redis_url: str | None = None  # None: embedded SQLite index under data_dir (local mode)
    keep_last: int = 0  # retention: keep the newest N checkpoints per job (0: keep all) ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of M (0: none)
    max_chunk_bytes: int = 8 << 20  # larger chunks are refused; bounds server memory per stream
    quota_bytes: int = 0  # 0: no quota; otherwise saves that would exceed it fail with RESOURCE_EXHAUSTED
    min_free_bytes: int = 64 << 20  # refuse a save that would leave less free disk than this
    read_chunk_bytes: int = 1 << 20
    max_save_streams: int = 8  # Save streams running at once (each holds ~10 MiB of buffers) ...
    max_load_streams: int = 16  # ... and Load streams (each ~4 MiB) ...
    max_waiting_streams: int = 256  # ... streams beyond those wait (unread, flow-controlled), up to this many
    stream_wait_seconds: float = 600.0  # a waiting stream is refused after this long
    pending_ttl_seconds: float = (
        86400.0  # uncommitted parts nobody writes are discarded after this (0: never)
    )
    redis_timeout_seconds: float = 2.0  # per Redis call: a hung Redis answers UNAVAILABLE this fast
    grace_seconds: float = 10.0
    metrics_port: int = 0  # Prometheus /metrics (bytes saved and loaded, calls); 0: none
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "quota_bytes", "min_free_bytes", "pending_ttl_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_save_streams", "max_load_streams", "stream_wait_seconds", "redis_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_waiting_streams < 0:
            raise ValueError("max_waiting_streams must be >= 0")
        if self.max_chunk_bytes <= 0 or self.read_chunk_bytes <= 0:
            raise ValueError("max_chunk_bytes and read_chunk_bytes must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.redis_url == "":
            object.__setattr__(self, "redis_url", None)


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Steps a retention policy keeps: the newest `keep_last`, plus multiples of `keep_every`."""
    if keep_last <= 0:
        return set(steps)
    keep = set(sorted(steps)[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep
