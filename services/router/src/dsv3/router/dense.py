"""The router's share of the model: everything but the routed experts, loaded without ever reading them.

The model is built on the meta device, every MoE layer's experts are replaced by `RemoteExperts` (no
parameters), then it is materialised and filled: from a Hugging Face directory with the core's loader
told to skip the routed experts' tensors, or from the checkpoint service by name (the non-expert
release names only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.hf import _CheckpointFiles, _Loader
from dsv3.model.hf_fp8 import fp8_block_size
from dsv3.model.hf_names import SharedCopy, release_slot, to_hf_state_dict
from dsv3.model.moe import MoE
from dsv3.router.remote import detach_experts


class _DenseLoader(_Loader):
    """The core's loader, minus the routed experts (per-expert or transformers' fused names)."""

    def _place(self, name, read) -> None:  # type: ignore[override]
        slot = release_slot(name, self.config)
        if not isinstance(slot, SharedCopy) and (
            slot.expert is not None
            or slot.name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))
        ):
            return
        super()._place(name, read)


def _build(config: ModelConfig, device: str) -> tuple[DeepSeekV3, list[tuple[int, MoE]]]:
    with torch.device("meta"):
        model = DeepSeekV3(config)
    layers = detach_experts(model)
    model.to_empty(device=device)
    return model.eval(), layers


def load_from_directory(
    directory: str | Path, device: str = "cpu"
) -> tuple[DeepSeekV3, list[tuple[int, MoE]]]:
    directory = Path(directory)
    config = ModelConfig.from_hf_config(directory / "config.json")
    block_size = fp8_block_size(json.loads((directory / "config.json").read_text()))
    model, layers = _build(config, device)
    _DenseLoader(model, _CheckpointFiles(directory), block_size).load_all()
    return model, layers


def load_from_checkpoint(
    address: str, job: str, step: int | None, config: ModelConfig, device: str = "cpu"
) -> tuple[DeepSeekV3, list[tuple[int, MoE]]]:
    from dsv3.checkpoint import CheckpointClient

    model, layers = _build(config, device)
    state = model.state_dict()
    names = [n for n in to_hf_state_dict(model) if not isinstance(release_slot(n, config), SharedCopy)]
    with CheckpointClient(address) as client:
        loaded = client.load(job, step, names=names)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {job}: missing {missing[:8]}")
    with torch.no_grad():
        for name in names:
            slot = release_slot(name, config)
            slot.view(state).copy_(loaded[name])
    return model, layers
