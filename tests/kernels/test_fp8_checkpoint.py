"""Reading the released FP8 checkpoint layout (weight e4m3 + weight_scale_inv 128x128 block scales)."""

import pytest
import torch

from dsv3.kernels import reference
from dsv3.kernels.fp8_checkpoint import dequantize_state_dict, split_fp8_state_dict
from dsv3.kernels.ops import KernelInputError


def _released(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint in the release layout: 2-D weights quantized, the rest kept."""
    state = {}
    for key, tensor in weights.items():
        if key.endswith("proj.weight"):
            state[key], state[key + "_scale_inv"] = reference.weight_quant(tensor)
        else:
            state[key] = tensor
    return state


@pytest.fixture
def original() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(50, 64).bfloat16(),  # unquantized in the release too
        "model.layers.0.self_attn.q_proj.weight": torch.randn(300, 200) * 0.02,  # partial blocks
        "model.layers.0.input_layernorm.weight": torch.ones(200),
        "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(128, 256) * 0.02,
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.zeros(8),
    }


def test_dequantize_state_dict(original) -> None:
    state = _released(original)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    out = dequantize_state_dict(state, dtype=torch.float32)
    assert list(out) == list(original)  # same keys, same order, scales dropped
    for key, tensor in original.items():
        if key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.3.down_proj.weight"):
            assert out[key].dtype == torch.float32
            w_q, w_s = state[key], state[key + "_scale_inv"]
            assert torch.equal(out[key], reference.weight_dequant(w_q, w_s, dtype=torch.float32))
            err = (out[key] - tensor).abs()
            assert (err <= tensor.abs() * 2**-4 + w_s.max() * 2**-10).all()
        else:
            assert out[key] is state[key]


def test_split_keeps_pairs(original) -> None:
    state = _released(original)
    plain, pairs = split_fp8_state_dict(state)
    assert set(pairs) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.experts.3.down_proj.weight",
    }
    weight, scale = pairs["model.layers.0.self_attn.q_proj.weight"]
    assert weight.dtype == torch.float8_e4m3fn and scale.shape == (3, 2) and scale.dtype == torch.float32
    assert set(plain) == set(original) - set(pairs)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"), "without"),
        (
            lambda s: s.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(2, 2)}),
            r"\(3, 2\)",
        ),
        (
            lambda s: s.update({"model.layers.0.input_layernorm.weight_scale_inv": torch.ones(1, 1)}),
            "scale without",
        ),
    ],
)
def test_inconsistent_checkpoints_are_refused(original, mutate, match) -> None:
    state = _released(original)
    mutate(state)
    with pytest.raises(KernelInputError, match=match):
        dequantize_state_dict(state)
