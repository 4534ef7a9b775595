"""Settings of a training run: one frozen dataclass, from `--config train.json`, flags and `DSV3_*` env.

Precedence: a flag beats its environment twin, which beats the JSON file, which beats the default.
Everything that can be checked before a process group exists is checked here (`TrainConfig` itself,
then `Layout.of` against the world size and the model), and every error names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsv3.model import ConfigError, ModelConfig
from dsv3.serving.flags import env_name, parse_config


class SettingsError(ValueError):
    """A training setting is invalid; the message starts with the field's name."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model and run length
    model: str = "debug"  # a flavour name (debug, 16b, 671b) or a config.json path
    steps: int = 200
    batch: int = 16  # sequences per step, global (split evenly over every rank)
    seq_len: int = 128
    # AdamW and the schedule: linear warmup, constant, cosine decay to min_lr_ratio * lr, constant
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    decay_start: int = -1  # step where the cosine decay begins; -1: at 80% of `steps`
    decay_steps: int = -1  # length of the decay; -1: until `steps`
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip; 0: off
    bf16: bool = False  # bf16 autocast for the forward
    fp8: bool = False  # FP8 projections (needs CUDA)
    # objective and balancing
    mtp_weight: float = 0.3
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight
    # parallelism: world = dp * ep
    ep: int = 1
    dp: int = 0  # 0: world size / ep
    collective_timeout: float = 60.0  # seconds; survivors of a dead peer give up after this
    # memory
    activation_checkpointing: str = "none"  # none | full (recompute each layer) | moe (the routed experts)
    micro_batches: int = 1  # forward/backward passes per optimizer step (must divide batch / world)
    # CPU: each micro-batch as N passes at once on N threads (dsv3.trainer.passes); 0: auto (2 on a CPU
    # with >= 2 torch threads at ep 1 when a micro-batch's sequences split in two), 1: off
    concurrent_passes: int = 0
    # anomaly detection (dsv3.trainer.anomaly) and what to do about one
    anomaly_policy: str = "warn"  # warn | skip (drop the step's update) | rollback (to the last checkpoint)
    max_rollbacks: int = 3  # rollbacks allowed in the run; the next anomaly fails the job with its reason
    spike_zscore: float = 6.0  # loss spike: robust z-score over the window above this (0: off)
    spike_window: int = 50  # steps of loss and grad-norm history the spike and explosion tests use
    spike_warmup: int = 10  # steps of history needed before the spike and explosion tests start
    grad_norm_factor: float = 10.0  # explosion: grad norm above this x the window's median (0: off)
    collapse_max_vio: float = 2.0  # expert collapse: a layer's MaxVio above this ... (0: off)
    collapse_steps: int = 50  # ... for this many consecutive steps
    stall_timeout: float = 900.0  # seconds without a completed step before the watchdog exits (0: off)
    anomaly_clear_steps: int = 10  # clean steps after an anomaly before the status reports healthy
    # data
    data: str = ""  # text file/dir, .jsonl, .tok shard (dsv3 tokenize); "": the Python stdlib source
    data_field: str = "text"  # the JSONL field holding the text
    tokenizer: str = "byte"  # "byte" or a Hugging Face tokenizer.json path
    held_out: float = 0.05  # fraction of the sequences kept for evaluation
    eval_sequences: int = 32  # held-out sequences evaluated at the start and the end (0: none)
    # checkpoints
    checkpoint: str = ""  # checkpoint service address; "": no checkpoints
    job: str = "train"
    checkpoint_interval: int = 50
    keep_last: int = 0  # delete older checkpoints of the job beyond the newest N (0: keep all)
    resume_from: str = "latest"  # latest: continue the job's newest committed checkpoint; none: start over
    # outputs
    output_dir: Path = Path("runs/train")
    export: str = ""  # write the final model as a Hugging Face directory here
    status_port: int = 0  # rank 0 serves TrainerService here; 0: no status server
    status_host: str = "0.0.0.0"
    metrics_port: int = 0  # rank 0 serves Prometheus metrics (/metrics) here; 0: none
    progress: str = "auto"  # auto (bar on a TTY, log lines otherwise), bar, log, none
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda

    def __post_init__(self) -> None:
        positive = (
            "steps", "batch", "seq_len", "checkpoint_interval", "log_interval", "ep", "micro_batches",
            "spike_window", "collapse_steps", "anomaly_clear_steps",
        )  # fmt: skip
        for name in positive:
            _require(name, getattr(self, name) > 0, "must be > 0", getattr(self, name))
        for name in (
            "warmup_steps",
            "keep_last",
            "dp",
            "concurrent_passes",
            "eval_sequences",
            "seed",
            "max_rollbacks",
            "spike_warmup",
        ):
            _require(name, getattr(self, name) >= 0, "must be >= 0", getattr(self, name))
        for name in ("lr", "eps", "collective_timeout"):
            value = getattr(self, name)
            _require(name, math.isfinite(value) and value > 0, "must be a finite number > 0", value)
        for name in ("beta1", "beta2"):
            _require(name, 0 <= getattr(self, name) < 1, "must be in [0, 1)", getattr(self, name))
        non_negative = (
            "weight_decay", "grad_clip", "mtp_weight", "bias_gamma", "balance_alpha",
            "spike_zscore", "grad_norm_factor", "collapse_max_vio", "stall_timeout",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            _require(name, math.isfinite(value) and value >= 0, "must be a finite number >= 0", value)
        _require("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]", self.min_lr_ratio)
        _require("held_out", 0 <= self.held_out < 1, "must be in [0, 1)", self.held_out)
        for name in ("decay_start", "decay_steps"):
            _require(name, getattr(self, name) >= -1, "must be >= 0 (or -1: automatic)", getattr(self, name))
        _require("seq_len", self.seq_len >= 3, "must be >= 3 (MTP predicts two tokens ahead)", self.seq_len)
        _require("status_port", 0 <= self.status_port < 65536, "must be in [0, 65535]", self.status_port)
        _require("metrics_port", 0 <= self.metrics_port < 65536, "must be in [0, 65535]", self.metrics_port)
        modes = ("auto", "bar", "log", "none")
        _require("progress", self.progress in modes, "must be auto|bar|log|none", self.progress)
        _require(
            "resume_from", self.resume_from in ("latest", "none"), "must be latest|none", self.resume_from
        )
        _require("device", self.device in ("auto", "cpu", "cuda"), "must be auto|cpu|cuda", self.device)
        recompute = ("none", "full", "moe")
        _require(
            "activation_checkpointing",
            self.activation_checkpointing in recompute,
            "must be none|full|moe",
            self.activation_checkpointing,
        )
        policies = ("warn", "skip", "rollback")
        _require(
            "anomaly_policy",
            self.anomaly_policy in policies,
            "must be warn|skip|rollback",
            self.anomaly_policy,
        )
        if self.anomaly_policy == "rollback" and not self.checkpoint:
            raise SettingsError("anomaly_policy: rollback needs a checkpoint service (--checkpoint)")
        _require(
            "spike_warmup",
            self.spike_warmup <= self.spike_window,
            f"must be <= spike_window ({self.spike_window})",
            self.spike_warmup,
        )
        if self.batch % self.micro_batches:
            raise SettingsError(f"micro_batches ({self.micro_batches}) must divide batch ({self.batch})")
        _require("job", bool(self.job) and "/" not in self.job, "must be a name without '/'", self.job)
        if self.data and not Path(self.data).exists():
            raise SettingsError(f"data: {self.data!r} does not exist")
        if self.tokenizer != "byte" and not Path(self.tokenizer).is_file():
            raise SettingsError(f"tokenizer: {self.tokenizer!r} is neither 'byte' nor a tokenizer.json file")
        if self.fp8 and self.device == "cpu":
            raise SettingsError("fp8: FP8 training needs CUDA (device is cpu)")

    # ---- derived --------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The model's config (flavour or config.json); errors name the `model` setting."""
        try:
            if Path(self.model).exists():
                return ModelConfig.from_hf_config(self.model)
            return ModelConfig.flavour(self.model)
        except ConfigError as exc:
            raise SettingsError(f"model: {exc}") from exc

    def micro_batch_sequences(self, world: int) -> int:
        """Sequences in each of a rank's micro-batches (what concurrent passes split)."""
        return self.batch // world // self.micro_batches

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based): warmup, constant, cosine decay, floor."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        start = self.decay_start if self.decay_start >= 0 else int(0.8 * self.steps)
        length = self.decay_steps if self.decay_steps >= 0 else max(self.steps - start, 0)
        if step <= start:
            return self.lr
        if length == 0 or step >= start + length:
            return self.lr * self.min_lr_ratio
        progress = (step - start) / length
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _require(name: str, ok: bool, what: str, value: object) -> None:
    if not ok:
        raise SettingsError(f"{name} {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: world = dp x ep, rank = dp_rank * ep + ep_rank (EP groups contiguous)."""

    world: int
    rank: int
    ep: int
    dp: int

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @classmethod
    def of(cls, config: TrainConfig, world: int, rank: int, model: ModelConfig) -> Layout:
        """Check the parallel sizes against the world size and the model; errors name the field."""
        dp = config.dp or world // config.ep
        if config.ep * dp != world:
            raise SettingsError(
                f"ep ({config.ep}) x dp ({config.dp or 'world/ep'}) must equal the world size ({world})"
            )
        if model.n_routed_experts % config.ep:
            raise SettingsError(
                f"ep ({config.ep}) must divide the model's n_routed_experts ({model.n_routed_experts})"
            )
        if config.batch % world:
            raise SettingsError(f"batch ({config.batch}) must be divisible by the world size ({world})")
        if (config.batch // world) % config.micro_batches:
            raise SettingsError(
                f"micro_batches ({config.micro_batches}) must divide each rank's batch "
                f"(batch {config.batch} / world {world} = {config.batch // world})"
            )
        if config.concurrent_passes > 1:
            if config.ep != 1:
                raise SettingsError(
                    f"concurrent_passes ({config.concurrent_passes}) needs ep 1: an expert-parallel pass "
                    f"runs all-to-alls, which passes on several threads cannot match across ranks "
                    f"(ep is {config.ep})"
                )
            sequences = config.micro_batch_sequences(world)
            if sequences % config.concurrent_passes:
                raise SettingsError(
                    f"concurrent_passes ({config.concurrent_passes}) must divide each micro-batch's "
                    f"{sequences} sequences (batch / world / micro_batches)"
                )
        if config.seq_len > model.max_position_embeddings:
            raise SettingsError(
                f"seq_len ({config.seq_len}) exceeds the model's max_position_embeddings "
                f"({model.max_position_embeddings})"
            )
        return cls(world, rank, config.ep, dp)


# ---- parsing ------------------------------------------------------------------------------------
def _file_values(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SettingsError(f"config: file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise SettingsError(f"config: {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"config: {path} must hold a JSON object")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting in {path} (known: {', '.join(sorted(known))})")
    return values


def parse_settings(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags > DSV3_* env > `--config` JSON file (or DSV3_CONFIG) > defaults; exits with a CLI error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=os.environ.get(env_name("config")) or None)
    known, rest = pre.parse_known_args(argv)
    prefix: list[str] = []
    if known.config is not None:
        try:
            values = _file_values(known.config)
        except SettingsError as exc:
            argparse.ArgumentParser(prog="dsv3-trainer").error(str(exc))
        for name, value in values.items():
            if env_name(name) in os.environ:
                continue  # the environment twin wins over the file
            text = json.dumps(value) if not isinstance(value, str) else value
            prefix += ["--" + name.replace("_", "-"), text]
    return parse_config(TrainConfig, [*prefix, *rest], description="dsv3 trainer (run under torchrun)")
