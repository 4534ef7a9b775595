"""`DeepSeekV3.enable_fp8_training`: which projections go FP8; nothing else about the model changes."""

import torch
from torch import nn

from dsv3.model import DeepSeekV3
from dsv3.model.fp8_linear import FP8Linear, convert_to_fp8
from dsv3.model.loss import language_model_loss
from dsv3.model.moe import GroupedExperts


def test_projections_go_fp8_and_the_rest_keeps_its_precision(debug_model: DeepSeekV3) -> None:
    before = {name: id(p) for name, p in debug_model.named_parameters()}
    state_keys = list(debug_model.state_dict())
    swapped = debug_model.enable_fp8_training()
    modules = dict(debug_model.named_modules())
    experts = [n for n, m in modules.items() if isinstance(m, GroupedExperts)]
    assert experts and set(experts) <= set(swapped) and all(modules[n].fp8 for n in experts)
    assert all(isinstance(modules[name], FP8Linear) for name in set(swapped) - set(experts))
    assert "model.layers.0.self_attn.q_a_proj" in swapped and "model.layers.0.mlp.down_proj" in swapped
    assert "model.layers.1.mlp.shared_experts.gate_proj" in swapped and "mtp.0.eh_proj" in swapped
    assert type(debug_model.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for n, m in modules.items() if n != "lm_head")
    # Same parameter objects under the same names: optimizers and checkpoints are unaffected.
    assert {name: id(p) for name, p in debug_model.named_parameters()} == before
    assert list(debug_model.state_dict()) == state_keys
    assert convert_to_fp8(debug_model) == ["lm_head"]  # nothing left but what was kept


def test_fp8_model_tracks_the_original_and_trains(debug_model: DeepSeekV3) -> None:
    ids = torch.randint(0, debug_model.config.vocab_size, (2, 40))
    with torch.no_grad():
        reference = debug_model(ids).logits
    debug_model.enable_fp8_training()
    debug_model.train()
    out = debug_model(ids)
    relative = ((out.logits.detach() - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.05  # quantized (not identical), yet e4m3-close
    language_model_loss(out, ids, mtp_weight=0.3).total.backward()
    missing = [n for n, p in debug_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_routed_experts_can_stay_bf16(debug_model: DeepSeekV3) -> None:
    swapped = debug_model.enable_fp8_training(routed_experts=False)
    experts = [m for m in debug_model.modules() if isinstance(m, GroupedExperts)]
    assert experts and not any(m.fp8 for m in experts)
    assert not any(name.endswith(".experts") for name in swapped)
    assert "model.layers.0.self_attn.q_a_proj" in swapped
    # converting again later picks the experts up, and only them
    assert set(convert_to_fp8(debug_model, keep=lambda n: n == "lm_head")) == {
        n for n, m in debug_model.named_modules() if isinstance(m, GroupedExperts)
    }


def test_fp8_experts_change_the_layer_only_by_quantization(debug_model: DeepSeekV3) -> None:
    """The routed experts' FP8 path computes the same function as bf16 up to e4m3 rounding, and its
    gradients reach the expert weights (empty experts get zeros, not None)."""
    layer = next(m for m in debug_model.modules() if isinstance(m, GroupedExperts))
    rows = torch.randn(30, layer.gate_up_proj.shape[2])
    counts = torch.zeros(layer.num_experts, dtype=torch.long)
    counts[:3] = torch.tensor([10, 0, 20])
    counts[5] = 0
    weights = torch.rand(30)
    exact = layer(rows, counts, weights)
    layer.enable_fp8()
    out = layer(rows, counts, weights)
    relative = ((out - exact).norm() / exact.norm()).item()
    assert 0 < relative < 0.1
    out.sum().backward()
    assert layer.gate_up_proj.grad[0].abs().sum() > 0 and not layer.gate_up_proj.grad[1].any()
    assert "fp8" in repr(layer)
