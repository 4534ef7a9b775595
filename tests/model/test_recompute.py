"""Activation checkpointing (`dsv3.model.recompute`): the same loss and gradients as keeping every
activation, fewer bytes kept for the backward, and the recomputation really happens (counted)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.decoder import DecoderLayer
from dsv3.model.loss import language_model_loss
from dsv3.model.moe import GroupedExperts
from dsv3.model.recompute import apply_activation_checkpointing


def _model(mode: str) -> DeepSeekV3:
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.flavour("debug")).train()
    apply_activation_checkpointing(model, mode)
    return model


def _step(model: DeepSeekV3, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd kept for the backward pass."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = language_model_loss(model(ids), ids, 0.3, 0.01).total
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, kept


def _count_calls(modules: list[nn.Module]) -> list[int]:
    calls = [0]
    for m in modules:
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", ["full", "moe"])
def test_recomputation_gives_the_plain_loss_and_gradients_and_keeps_less(mode: str) -> None:
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads, plain_kept = _step(_model("none"), ids)
    model = _model(mode)
    experts = _count_calls([m for m in model.modules() if isinstance(m, GroupedExperts)])
    attention = _count_calls([m.self_attn for m in model.modules() if isinstance(m, DecoderLayer)])
    loss, grads, kept = _step(model, ids)
    assert loss == plain_loss
    worst = max(float((grads[n] - g).abs().max() / (g.abs().max() + 1e-30)) for n, g in plain_grads.items())
    assert worst <= 1e-6, worst
    moe_layers = sum(1 for m in model.modules() if isinstance(m, GroupedExperts))  # 2 main + 1 MTP
    layers = sum(1 for m in model.modules() if isinstance(m, DecoderLayer))  # 3 main + 1 MTP
    assert experts[0] == 2 * moe_layers  # each expert SwiGLU ran again in the backward
    assert attention[0] == (2 * layers if mode == "full" else layers)
    assert kept < plain_kept * (0.5 if mode == "full" else 0.95), (kept, plain_kept)


def test_no_grad_and_eval_forward_never_recompute_and_unknown_modes_are_refused() -> None:
    model = _model("full")
    attention = _count_calls([m.self_attn for m in model.modules() if isinstance(m, DecoderLayer)])
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    assert attention[0] == 4
    with pytest.raises(ValueError, match=r"activation_checkpointing must be one of none\|full\|moe"):
        apply_activation_checkpointing(model, "selective")
    assert apply_activation_checkpointing(model, "none") == 0
    assert not any(getattr(m, "recompute", False) for m in model.modules())
