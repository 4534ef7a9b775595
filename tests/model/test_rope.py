"""YaRN frequencies, the attention-scale correction and interleaved-pair rotation."""

import math

import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.config import RopeConfig
from dsv3.model.rope import apply_rotary, inverse_frequencies, rotary_amplitude


def test_plain_rope_frequencies() -> None:
    freqs = inverse_frequencies(RopeConfig(theta=10000.0), 8)
    assert torch.allclose(freqs, torch.tensor([1.0, 0.1, 0.01, 0.001]))


def test_yarn_keeps_high_and_interpolates_low_frequencies() -> None:
    rope = ModelConfig.flavour("671b").rope
    plain = inverse_frequencies(RopeConfig(theta=rope.theta), 64)
    yarn = inverse_frequencies(rope, 64)
    assert torch.allclose(yarn[:8], plain[:8])  # fast dims: extrapolated unchanged
    assert torch.allclose(yarn[-4:], plain[-4:] / rope.factor)  # slow dims: divided by factor
    ratio = plain / yarn
    assert ((ratio >= 1 - 1e-6) & (ratio <= rope.factor + 1e-4)).all()
    assert (ratio[1:] >= ratio[:-1] - 1e-6).all()  # monotone blend in between


def test_yarn_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for flavour in ("debug", "671b", "16b"):
        ours = ModelConfig.flavour(flavour)
        theirs = transformers.DeepseekV3Config(**ours.to_hf_config())
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
        assert torch.allclose(inverse_frequencies(ours.rope, ours.qk_rope_head_dim), inv_freq, rtol=1e-6)
        assert rotary_amplitude(ours.rope) == pytest.approx(attention_factor)


def test_v3_amplitude_is_one_and_scale_is_corrected() -> None:
    config = ModelConfig.flavour("671b")
    assert rotary_amplitude(config.rope) == pytest.approx(1.0)
    assert config.softmax_scale / config.qk_head_dim**-0.5 == pytest.approx((0.1 * math.log(40) + 1) ** 2)


def test_rotation_acts_on_interleaved_pairs() -> None:
    x = torch.tensor([[[[1.0, 0.0, 0.0, 2.0]]]])  # [B=1, T=1, H=1, R=4]
    angle = torch.tensor([[math.pi / 2, math.pi]])
    out = apply_rotary(x, angle.cos(), angle.sin())
    # pair (1, 0) turned by 90 degrees -> (0, 1); pair (0, 2) turned by 180 degrees -> (0, -2)
    assert torch.allclose(out, torch.tensor([[[[0.0, 1.0, 0.0, -2.0]]]]), atol=1e-6)


def test_scores_depend_only_on_relative_position() -> None:
    freqs = inverse_frequencies(RopeConfig(), 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pos_q: int, pos_k: int) -> float:
        rot = [(torch.tensor([[float(p)]]) * freqs) for p in (pos_q, pos_k)]
        qr = apply_rotary(q, rot[0].cos(), rot[0].sin())
        kr = apply_rotary(k, rot[1].cos(), rot[1].sin())
        return float((qr * kr).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-4)


def test_casting_the_model_keeps_frequencies_and_routing_bias_float32(debug_config: ModelConfig) -> None:
    """bf16 frequencies would put ~1.8 rad of error into 671B's rope angles by position 4096."""
    model = DeepSeekV3(debug_config)
    bias = torch.linspace(-1e-3, 1e-3, debug_config.n_routed_experts) + 1e-7  # not bf16-representable
    model.gates()[0].e_score_correction_bias.copy_(bias)
    model.to(torch.bfloat16)
    expected = inverse_frequencies(debug_config.rope, debug_config.qk_rope_head_dim)
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary_emb.inv_freq, expected)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.gates()[0].e_score_correction_bias, bias)  # not rounded through bf16
    # Built on meta and materialised (how from_pretrained builds): the frequencies are real values.
    with torch.device("meta"):
        lazy = DeepSeekV3(debug_config)
    lazy.to_empty(device="cpu")
    assert torch.equal(lazy.rotary_emb.inv_freq, expected)
