"""`--export DIR`: the final model as a Hugging Face directory that `DeepSeekV3.from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.model import DeepSeekV3
from dsv3.trainer.parallel import Groups, gather_experts


@torch.no_grad()
def export_model(model: DeepSeekV3, groups: Groups, directory: str | Path) -> Path | None:
    """Gather the expert slices (a collective: every rank calls it); rank 0 writes the directory."""
    experts = gather_experts(model, groups)
    if groups.layout.rank != 0:
        return None
    with torch.device("meta"):
        full = DeepSeekV3(model.config)
    full.to_empty(device="cpu")
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    state.update({name: tensor.cpu() for name, tensor in experts.items()})
    full.load_state_dict(state, strict=True)
    full.save_pretrained(directory)
    return Path(directory)
