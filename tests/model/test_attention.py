"""MLA: the absorbed, latent-cache decode path reproduces the full forward pass."""

import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.cache import KVCache


def _decode_token_by_token(model: DeepSeekV3, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])]
    assert cache.length == ids.shape[1]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    "change",
    [
        {},  # debug flavour: q LoRA, YaRN
        {"q_lora_rank": None},  # direct q_proj, as DeepSeek-V2-Lite
        {"rope_scaling": None},  # plain RoPE
        {"v_head_dim": 24},  # v wider than qk_nope
    ],
)
@torch.no_grad()
def test_cached_decode_matches_full_forward(change: dict) -> None:
    config = ModelConfig.from_hf_config(ModelConfig.flavour("debug").to_hf_config() | change)
    model = DeepSeekV3(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    full = model(ids).logits
    decoded = _decode_token_by_token(model, ids)
    assert (decoded - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_chunked_prefill_then_decode_matches_full(debug_model: DeepSeekV3) -> None:
    ids = torch.randint(0, 256, (3, 20))
    full = debug_model(ids).logits
    cache = debug_model.new_cache(3, 32)
    first = debug_model(ids[:, :13], cache=cache).logits
    rest = [debug_model(ids[:, t : t + 1], cache=cache).logits for t in range(13, 20)]
    assert (torch.cat([first, *rest], dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_attention_is_causal(debug_model: DeepSeekV3) -> None:
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 256
    a, b = debug_model(ids).logits, debug_model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


def test_cache_holds_only_latent_and_rope_key() -> None:
    config = ModelConfig.flavour("671b")
    cache = KVCache(config, num_layers=2, batch=1, max_length=4, dtype=torch.bfloat16, device="meta")
    # 512 latent + 64 rope key values per token and layer, bf16
    assert cache.bytes_per_token() == 2 * (512 + 64) * 2


def test_cache_rejects_overflow_and_wrong_batch(debug_model: DeepSeekV3) -> None:
    cache = debug_model.new_cache(1, 4)
    with torch.no_grad():
        debug_model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            debug_model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            debug_model(torch.zeros(2, 1, dtype=torch.long), cache=debug_model.new_cache(1, 4))


def test_input_ids_must_be_2d(debug_model: DeepSeekV3) -> None:
    with pytest.raises(ValueError, match="input_ids"):
        debug_model(torch.zeros(5, dtype=torch.long))
