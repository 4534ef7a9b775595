"""Model configuration in the Hugging Face DeepSeek-V3 `config.json` vocabulary.

The field names are the checkpoint's own, so a released `config.json` loads unchanged and a saved one
loads in transformers. Validation happens once, here, so the model code can trust every field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

_CONFIG_DIR = Path(__file__).parent / "configs"

# Keys transformers or the DeepSeek release write that carry nothing this implementation needs.
_IGNORED_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "pretraining_tp",
    "attention_dropout",
    "output_router_logits",
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "quantization_config",
    "head_dim",
    "qk_head_dim",
    "pad_token_id",
    "num_mtp_layers",
    "rope_interleave",
    "moe_layer_freq",
    "topk_method",
    "scoring_func",
    "router_aux_loss_coef",
    "tie_word_embeddings",
    "_name_or_path",
    "partial_rotary_factor",
}


class ConfigError(ValueError):
    """A config field is missing, malformed or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: plain RoPE or YaRN as DeepSeek-V3 uses it."""

    rope_type: str = "default"  # "default" or "yarn"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    @staticmethod
    def parse(raw: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
        """Read either the `rope_parameters` block or the older `rope_theta` + `rope_scaling` pair."""
        params = raw.get("rope_parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ConfigError("rope_parameters must be an object")
            block = dict(params)
            theta = block.pop("rope_theta", raw.get("rope_theta", 10000.0))
        else:
            scaling = raw.get("rope_scaling")
            if scaling is not None and not isinstance(scaling, dict):
                raise ConfigError("rope_scaling must be an object or null")
            block = dict(scaling or {})
            theta = raw.get("rope_theta", 10000.0)
        rope_type = block.pop("rope_type", None) or block.pop("type", None) or "default"
        block.pop("type", None)
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope type {rope_type!r} is not supported (use 'default' or 'yarn')")
        if not isinstance(theta, int | float) or theta <= 1:
            raise ConfigError(f"rope_theta must be a number > 1, got {theta!r}")
        if rope_type == "default":
            return RopeConfig(theta=float(theta))
        original = block.get("original_max_position_embeddings") or max_position_embeddings
        factor = block.get("factor") or max_position_embeddings / original
        rope = RopeConfig(
            rope_type="yarn",
            theta=float(theta),
            factor=float(factor),
            original_max_position_embeddings=int(original),
            beta_fast=float(block.get("beta_fast") or 32.0),
            beta_slow=float(block.get("beta_slow") or 1.0),
            mscale=float(block.get("mscale") or 0.0),
            mscale_all_dim=float(block.get("mscale_all_dim") or 0.0),
            truncate=bool(block.get("truncate", True)),
        )
        if rope.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {rope.factor}")
        if rope.beta_fast <= rope.beta_slow:
            raise ConfigError("rope_scaling.beta_fast must be greater than rope_scaling.beta_slow")
        return rope

    def to_hf(self) -> tuple[float, dict[str, Any] | None]:
        """(rope_theta, rope_scaling) as DeepSeek's released config.json spells them."""
        if self.rope_type == "default":
            return self.theta, None
        return self.theta, {
            "type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
        }


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention-temperature correction m(s) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 hyper-parameters, named as in the Hugging Face `config.json`."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """Attention scale: 1/sqrt(qk_head_dim), times m(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            scale *= yarn_mscale(self.rope.factor, self.rope.mscale_all_dim) ** 2
        return scale

    # ---- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from a config.json path, a directory holding one, or an already-parsed dict."""
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            try:
                raw = json.loads(path.read_text())
            except FileNotFoundError as exc:
                raise ConfigError(f"config file not found: {path}") from exc
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError(
                f"scoring_func {raw['scoring_func']!r} is not supported (DeepSeek-V3 uses 'sigmoid')"
            )
        if raw.get("moe_layer_freq", 1) != 1:
            raise ConfigError("moe_layer_freq must be 1: every layer after first_k_dense_replace is MoE")
        heads = raw.get("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads", heads)
        if kv_heads != heads:
            raise ConfigError(
                f"num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) for MLA"
            )
        if "num_nextn_predict_layers" not in raw and "num_mtp_layers" in raw:
            raw["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope"}
        known = (
            fields | _IGNORED_KEYS | {"rope_theta", "rope_scaling", "rope_parameters", "num_key_value_heads"}
        )
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        kwargs = {k: raw[k] for k in fields if k in raw}
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        max_pos = raw.get("max_position_embeddings", cls.max_position_embeddings)
        return cls(**kwargs, rope=RopeConfig.parse(raw, max_pos))

    @classmethod
    def flavour(cls, name: str) -> ModelConfig:
        """A config shipped with the package: 'debug' (CPU tests), '16b', '671b'."""
        path = _CONFIG_DIR / f"{name}.json"
        if not path.exists():
            known = sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))
            raise ConfigError(f"unknown model flavour {name!r}; known: {', '.join(known)}")
        return cls.from_hf_config(path)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict that transformers' DeepseekV3Config and DeepSeek's release understand."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope"}
        theta, scaling = self.rope.to_hf()
        out.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            rope_theta=theta,
            rope_scaling=scaling,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            moe_layer_freq=1,
            tie_word_embeddings=False,
        )
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_config(), indent=2, sort_keys=True) + "\n")
        return path

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- validation ------------------------------------------------------------------------------
    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim must be even (rotated in pairs), got {self.qk_rope_head_dim}"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
        if self.n_group > 1 and self.experts_per_group < 2:
            raise ConfigError("each expert group needs >= 2 experts (group score = sum of its top-2)")
        if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts reachable in "
                f"topk_group ({self.topk_group}) groups of {self.experts_per_group}"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.routed_scaling_factor <= 0:
            raise ConfigError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if not isinstance(self.rope, RopeConfig):
            raise ConfigError("rope must be a RopeConfig")
