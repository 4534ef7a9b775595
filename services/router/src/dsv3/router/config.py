"""Settings of the router; every field is a flag and a `DSV3_*` environment variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    port: int = 50090
    host: str = "0.0.0.0"
    http_port: int = 8000  # the OpenAI-compatible HTTP API on the same host; 0: none
    served_model_name: str = ""  # the API's model id; empty: the model directory's name, or the job
    tokenizer: str = ""  # empty: the model directory's tokenizer.json, else bytes; 'byte'; or a path
    model_dir: str | None = None  # Hugging Face layout (also DeepSeek's FP8 release) ...
    checkpoint: str | None = None  # ... or the checkpoint service's address, with --job [--step]
    job: str | None = None
    model_config: str = ""  # with --checkpoint: a flavour name (debug, 16b, 671b) or a config.json path
    step: int = -1  # -1: the latest committed step
    shards: str = ""  # host:port,host:port (static list) ...
    shards_dns: str = ""  # ... or NAME:PORT of a headless Service, re-resolved every discovery interval ...
    redis_url: str | None = None  # ... or the Redis registry the shards announce themselves in
    replicas: int = 2  # copies of each expert, when the shards' slots allow
    redundant_experts: int = 0  # extra slots per MoE layer for more copies of the busiest experts
    rebalance_interval: float = 0.0  # seconds between re-plans from the observed load; 0: off
    rebalance_tolerance: float = 0.05  # keep slots in place while within this of a fresh plan's balance
    load_window_seconds: float = 60.0  # the expert load a plan follows: this many recent seconds
    device: str = ""  # cpu | cuda; empty: cuda when present
    speculative: bool = (
        True  # MTP speculative decoding when the checkpoint has MTP layers (--speculative off)
    )
    max_batch: int = 64  # sequences decoded together
    # torch threads of a decode step; 0: all (OMP_NUM_THREADS), as prefill steps get. A decode step is
    # small and waits on the shards between layers: on a CPU whose cores the shards share, an OpenMP
    # team's barriers stall on descheduled workers (batch-64 decode 1.3x faster on 1 thread than 2)
    decode_threads: int = 1
    max_length: int = 0  # context per sequence (prompt + new tokens); 0: min(max_position_embeddings, 4096)
    shard_timeout_seconds: float = 10.0  # deadline of one Compute call
    load_timeout_seconds: float = 300.0  # deadline of one LoadSlots call
    health_interval_seconds: float = 0.5  # how often a down shard is checked
    discovery_interval_seconds: float = 2.0
    startup_timeout_seconds: float = 120.0  # wait this long for shards at start
    max_message_bytes: int = 256 << 20
    grace_seconds: float = 5.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in ("model_dir", "checkpoint", "job", "redis_url"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        if (self.model_dir is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of --model-dir or --checkpoint (with --job)")
        if self.checkpoint is not None and not (self.job and self.model_config):
            raise ValueError("--checkpoint needs --job and --model-config")
        if sum(bool(x) for x in (self.shards, self.shards_dns, self.redis_url)) != 1:
            raise ValueError("give exactly one of --shards, --shards-dns or --redis-url")
        if self.shards_dns and ":" not in self.shards_dns:
            raise ValueError(f"--shards-dns must be NAME:PORT, got {self.shards_dns!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")
        if self.rebalance_interval < 0:
            raise ValueError(f"rebalance_interval must be >= 0 (0: off), got {self.rebalance_interval}")
        if not 0 <= self.rebalance_tolerance < 10:
            raise ValueError(f"rebalance_tolerance must be in [0, 10), got {self.rebalance_tolerance}")
        if self.load_window_seconds <= 0:
            raise ValueError(f"load_window_seconds must be > 0, got {self.load_window_seconds}")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (0: all), got {self.decode_threads}")
        if self.max_batch < 1 or self.max_length < 0:
            raise ValueError("max_batch must be >= 1 and max_length >= 0")
        for name in (
            "shard_timeout_seconds",
            "load_timeout_seconds",
            "health_interval_seconds",
            "discovery_interval_seconds",
            "startup_timeout_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not self.device:
            import torch

            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model_dir is not None:
            return Path(self.model_dir).resolve().name
        return str(self.job)

    @property
    def static_shards(self) -> list[str]:
        return [a.strip() for a in self.shards.split(",") if a.strip()]
