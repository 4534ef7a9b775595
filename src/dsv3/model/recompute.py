"""Activation checkpointing: recompute activations in the backward pass instead of keeping them.

Modes, per decoder layer (main stack and MTP blocks alike):
- `none`: keep every activation (fastest, most memory);
- `full`: keep only each layer's input and recompute the whole layer (attention, gate, dispatch, experts)
  during its backward;
- `moe`: recompute only the routed experts' SwiGLU (their [rows, 2F] and [rows, F] intermediates are the
  largest activations of an MoE layer); attention, the gate and the dispatch keep theirs, so no
  collective runs twice.
Recomputation is `torch.utils.checkpoint` in its non-reentrant form: it composes with autograd Functions
(the all-to-all), keyword arguments and outputs that are not tensors (the gate's `Routing`), and it gives
bitwise the same gradients as keeping the activations (no randomness in the model).
"""

from __future__ import annotations

from torch import nn

from dsv3.model.decoder import DecoderLayer
from dsv3.model.moe import MoE

MODES = ("none", "full", "moe")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Set `mode` on every decoder layer of `model` (in place); returns how many layers recompute."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing must be one of {'|'.join(MODES)}, got {mode!r}")
    count = 0
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        layer.recompute = mode == "full"
        if isinstance(layer.mlp, MoE):
            layer.mlp.recompute_experts = mode == "moe"
        count += mode == "full" or (mode == "moe" and isinstance(layer.mlp, MoE))
    return count
