"""Read and write the Hugging Face / DeepSeek release checkpoint layout.

Internal names equal the checkpoint's except for two things this module translates:
- routed experts are stacked (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F])
  while the release stores `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert;
- MTP module k lives under `mtp.{k-1}.` internally and under `model.layers.{num_hidden_layers+k-1}.`
  in the release (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the block's own names, plus copies
  of the shared `embed_tokens` and `shared_head.head` that are written on save and checked on load).
Transformers' own fused names (`mlp.experts.gate_up_proj`) load as well.

DeepSeek publishes V3 in FP8: each quantized projection is a float8_e4m3fn `weight` plus a float32
`weight_scale_inv` per 128x128 block (`quantization_config.weight_block_size`), and the real weight is
their product. Loading dequantizes those pairs; a saved checkpoint is unquantized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.model.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from dsv3.model.transformer import DeepSeekV3

_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_MTP_INTERNAL = re.compile(r"^mtp\.(?P<index>\d+)\.(?P<rest>.+)$")
_LAYER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_SCALE_SUFFIX = "_scale_inv"
_MTP_OWN = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}
_MTP_SHARED_COPIES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "shared_head.head.weight": "lm_head.weight",
}


class CheckpointFormatError(ValueError):
    """A checkpoint directory does not match the model it is loaded into."""


# ---- internal -> release ---------------------------------------------------------------------------
def _split_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = name.rsplit(".", 1)[0]
    if name.endswith(".gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", gate[e]
            yield f"{prefix}.{e}.up_proj.weight", up[e]
    else:
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", tensor[e]


def to_hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """The model's tensors under the release's names (experts split, MTP as extra layers)."""
    layers = model.config.num_hidden_layers
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _MTP_INTERNAL.match(name)
        if match:
            layer_prefix = f"model.layers.{layers + int(match['index'])}."
            rest = match["rest"]
            if rest == "shared_head_norm.weight":
                name = layer_prefix + "shared_head.norm.weight"
            elif rest.startswith("block."):
                name = layer_prefix + rest.removeprefix("block.")
            else:
                name = layer_prefix + rest
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            out.update(_split_experts(name, tensor))
        else:
            out[name] = tensor
    for k in range(len(model.mtp)):
        layer_prefix = f"model.layers.{layers + k}."
        for copy_name, source in _MTP_SHARED_COPIES.items():
            out[layer_prefix + copy_name] = state[source]
    return out


# ---- release -> internal ---------------------------------------------------------------------------
def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Translate release names to internal ones, stacking per-expert weights."""
    layers = config.num_hidden_layers
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    copies: list[tuple[str, str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        layer_match = _LAYER.match(name)
        if layer_match and int(layer_match["layer"]) >= layers:
            index, rest = int(layer_match["layer"]) - layers, layer_match["rest"]
            if index >= config.num_nextn_predict_layers:
                raise CheckpointFormatError(
                    f"{name}: checkpoint has more MTP layers than num_nextn_predict_layers="
                    f"{config.num_nextn_predict_layers}"
                )
            if rest in _MTP_SHARED_COPIES:
                copies.append((name, _MTP_SHARED_COPIES[rest], tensor))
                continue
            if rest == "shared_head.norm.weight":
                name = f"mtp.{index}.shared_head_norm.weight"
            elif rest in _MTP_OWN:
                name = f"mtp.{index}.{rest}"
            else:
                name = f"mtp.{index}.block.{rest}"
        expert_match = _EXPERT.match(name)
        if expert_match:
            per_expert = experts.setdefault(expert_match["prefix"], {})
            per_expert.setdefault(int(expert_match["expert"]), {})[expert_match["proj"]] = tensor
        else:
            out[name] = tensor
    for prefix, by_expert in experts.items():
        count = config.n_routed_experts
        missing = [
            e for e in range(count) if set(by_expert.get(e, {})) != {"gate_proj", "up_proj", "down_proj"}
        ]
        if missing or len(by_expert) != count:
            raise CheckpointFormatError(f"{prefix}: incomplete experts (missing or partial: {missing[:8]})")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((by_expert[e]["gate_proj"], by_expert[e]["up_proj"])) for e in range(count)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([by_expert[e]["down_proj"] for e in range(count)])
    for name, source, tensor in copies:
        if source in out and not torch.equal(out[source].to(tensor.dtype), tensor):
            raise CheckpointFormatError(
                f"{name} differs from {source}; dsv3 shares it between main model and MTP"
            )
    return out


# ---- FP8 release checkpoints -----------------------------------------------------------------------
def fp8_block_size(raw_config: dict) -> int:
    """The square block edge of an FP8 checkpoint's weight scales (DeepSeek's release: 128)."""
    quant = raw_config.get("quantization_config")
    if quant is None:
        return 128
    if not isinstance(quant, dict):
        raise ConfigError(f"quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method", "fp8")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    block = quant.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or block[0] != block[1]
        or not isinstance(block[0], int)
        or block[0] <= 0
    ):
        raise ConfigError(
            f"quantization_config.weight_block_size must be a square [b, b] of positive ints, got {block!r}"
        )
    return block[0]


def dequantize_fp8(tensors: dict[str, torch.Tensor], block_size: int) -> dict[str, torch.Tensor]:
    """Replace every float8 `X.weight` + `X.weight_scale_inv` pair by the float32 weight it encodes."""
    from dsv3.kernels import reference  # any block edge, on the CPU tensors safetensors hands back

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(_SCALE_SUFFIX):
            if name.removesuffix(_SCALE_SUFFIX) not in tensors:
                raise CheckpointFormatError(f"{name} has no weight {name.removesuffix(_SCALE_SUFFIX)}")
            continue
        if tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            out[name] = tensor
            continue
        scale = tensors.get(name + _SCALE_SUFFIX)
        if scale is None:
            raise CheckpointFormatError(f"{name} is {tensor.dtype} but {name}{_SCALE_SUFFIX} is missing")
        if tensor.dtype != torch.float8_e4m3fn or tensor.dim() != 2:
            raise CheckpointFormatError(
                f"{name}: FP8 weights must be 2-D float8_e4m3fn, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        rows, cols = tensor.shape
        blocks = (-(-rows // block_size), -(-cols // block_size))
        if tuple(scale.shape) != blocks or not scale.is_floating_point():
            raise CheckpointFormatError(
                f"{name}{_SCALE_SUFFIX}: expected float scales of shape {blocks} "
                f"({block_size}x{block_size} blocks of a {rows}x{cols} weight), "
                f"got {scale.dtype} {tuple(scale.shape)}"
            )
        out[name] = reference.weight_dequant(tensor, scale.float(), block_size, torch.float32)
    return out


# ---- files -----------------------------------------------------------------------------------------
def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointFormatError(f"no *.safetensors files in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in tensors:
                    raise CheckpointFormatError(f"tensor {name} appears in more than one file ({file.name})")
                tensors[name] = handle.get_tensor(name)
    return tensors


def load_pretrained(
    cls: type[DeepSeekV3],
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> DeepSeekV3:
    """Build the model from `config.json` and load every `*.safetensors` file in the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"checkpoint directory not found: {directory}")
    config = ModelConfig.from_hf_config(directory / "config.json")
    raw_config = json.loads((directory / "config.json").read_text())
    tensors = dequantize_fp8(read_safetensors_dir(directory), fp8_block_size(raw_config))
    state = from_hf_state_dict(tensors, config)
    with torch.device(device):
        model = cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointFormatError(
            f"checkpoint does not match config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointFormatError(
                f"{name}: shape {tuple(tensor.shape)} in checkpoint, {tuple(expected[name].shape)} in model"
            )
    model.load_state_dict(state)
    if dtype is not None:
        model.to(dtype)
        for gate in model.gates():  # the routing bias stays float32, as in the release
            gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    return model


def save_pretrained(model: DeepSeekV3, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and the tensors in release layout, sharded with an index when large."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in to_hf_state_dict(model).items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
