"""Names of the Hugging Face / DeepSeek release checkpoint layout, and where each tensor goes.

Internal names equal the checkpoint's except for two things this module translates:
- routed experts are stacked (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F])
  while the release stores `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert;
- MTP module k lives under `mtp.{k-1}.` internally and under `model.layers.{num_hidden_layers+k-1}.`
  in the release (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the block's own names, plus copies
  of the shared `embed_tokens` and `shared_head.head` that are written on save and checked on load).
Transformers' own fused names (`mlp.experts.gate_up_proj`) load as well.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from dsv3.model.config import ModelConfig

if TYPE_CHECKING:
    from dsv3.model.transformer import DeepSeekV3

_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_MTP_INTERNAL = re.compile(r"^mtp\.(?P<index>\d+)\.(?P<rest>.+)$")
_LAYER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_MTP_OWN = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}
_MTP_SHARED_COPIES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "shared_head.head.weight": "lm_head.weight",
}
STACKED_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


class CheckpointFormatError(ValueError):
    """A checkpoint directory does not match the model it is loaded into."""


# ---- internal -> release ---------------------------------------------------------------------------
def _split_experts(name: str, tensor: torch.Tensor, first_expert: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert release names; `first_expert` makes the indices layer-wide on an expert-parallel rank."""
    prefix = name.rsplit(".", 1)[0]
    if name.endswith(".gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{first_expert + e}.gate_proj.weight", gate[e]
            yield f"{prefix}.{first_expert + e}.up_proj.weight", up[e]
    else:
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{first_expert + e}.down_proj.weight", tensor[e]


def to_hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """The model's tensors under the release's names (experts split, MTP as extra layers)."""
    state = model.state_dict()
    out = to_release_names(model, state)
    for k in range(len(model.mtp)):
        layer_prefix = f"model.layers.{model.config.num_hidden_layers + k}."
        for copy_name, source in _MTP_SHARED_COPIES.items():
            out[layer_prefix + copy_name] = state[source]
    return out


def to_release_names(model: DeepSeekV3, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors keyed by internal names (the state dict, or per-parameter optimizer moments) under the
    release's names; stacked experts become per-expert views (layer-wide indices on a sharded layer)."""
    layers = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        original = name
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
        if name.endswith(STACKED_EXPERTS):
            owner = model.get_submodule(original.rsplit(".", 1)[0])
            out.update(_split_experts(name, tensor, owner.first_expert))
        else:
            out[name] = tensor
    return out


# ---- release -> internal ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one release tensor goes: an internal state-dict entry, or one expert's part of a stack."""

    name: str
    expert: int | None = None
    half: int | None = None  # of `gate_up_proj`: 0 the gate rows, 1 the up rows

    def view(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        tensor = state[self.name]
        if self.expert is not None:
            tensor = tensor[self.expert]
        if self.half is not None:
            tensor = tensor.chunk(2, dim=0)[self.half]
        return tensor


@dataclasses.dataclass(frozen=True)
class SharedCopy:
    """An MTP layer's copy of a main-model tensor (`source`, a release name): checked, not loaded."""

    source: str


def release_slot(name: str, config: ModelConfig) -> Slot | SharedCopy:
    """The internal destination of the release tensor `name`."""
    layers = config.num_hidden_layers
    layer_match = _LAYER.match(name)
    if layer_match and int(layer_match["layer"]) >= layers:
        index, rest = int(layer_match["layer"]) - layers, layer_match["rest"]
        if index >= config.num_nextn_predict_layers:
            raise CheckpointFormatError(
                f"{name}: checkpoint has more MTP layers than num_nextn_predict_layers="
                f"{config.num_nextn_predict_layers}"
            )
        if rest in _MTP_SHARED_COPIES:
            return SharedCopy(_MTP_SHARED_COPIES[rest])
        if rest == "shared_head.norm.weight":
            name = f"mtp.{index}.shared_head_norm.weight"
        elif rest in _MTP_OWN:
            name = f"mtp.{index}.{rest}"
        else:
            name = f"mtp.{index}.block.{rest}"
    expert_match = _EXPERT.match(name)
    if not expert_match:
        return Slot(name)
    expert, proj = int(expert_match["expert"]), expert_match["proj"]
    if expert >= config.n_routed_experts:
        raise CheckpointFormatError(f"{name}: expert {expert} but n_routed_experts={config.n_routed_experts}")
    if proj == "down_proj":
        return Slot(f"{expert_match['prefix']}.down_proj", expert)
    return Slot(f"{expert_match['prefix']}.gate_up_proj", expert, 0 if proj == "gate_proj" else 1)
