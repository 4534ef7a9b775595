"""DeepSeek's FP8 release layout: float8_e4m3fn `weight` + per-block `weight_scale_inv` load dequantized."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.config import ConfigError
from dsv3.model.hf import CheckpointFormatError

BLOCK = 16  # smaller than the release's 128 so the debug flavour's weights span several, partial blocks


def _fp8_config(block: int) -> dict:
    edge = [block, block]
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": edge}


FP8_CONFIG = _fp8_config(BLOCK)


def _quantize(weight: torch.Tensor, block_edge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block by block, as DeepSeek's release does: (fp8 weight, scales, the weight they encode)."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block_edge), math.ceil(cols / block_edge))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    encoded = torch.empty(rows, cols)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = (slice(i * block_edge, (i + 1) * block_edge), slice(j * block_edge, (j + 1) * block_edge))
            scales[i, j] = weight[block].abs().max().clamp_min(1e-4) / 448
            quantized[block] = (weight[block] / scales[i, j]).to(torch.float8_e4m3fn)
            encoded[block] = quantized[block].float() * scales[i, j]
    return quantized, scales, encoded


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors")
    return directory


def _release(tmp_path: Path, model_config: ModelConfig, block_edge: int = BLOCK) -> dict:
    """An FP8 release-layout checkpoint of a random model, and the plain weights it encodes."""
    DeepSeekV3(model_config).save_pretrained(tmp_path / "source")
    plain = load_file(tmp_path / "source" / "model.safetensors")
    config = json.loads((tmp_path / "source" / "config.json").read_text())
    fp8, encoded = {}, dict(plain)
    for name, weight in plain.items():
        if name.endswith(("_proj.weight", "_proj_with_mqa.weight")):  # the gate, norms, embeddings stay wide
            fp8[name], fp8[name + "_scale_inv"], encoded[name] = _quantize(weight, block_edge)
        else:
            fp8[name] = weight
    return {
        "fp8_dir": _write(tmp_path / "fp8", config | {"quantization_config": _fp8_config(block_edge)}, fp8),
        "encoded_dir": _write(tmp_path / "encoded", config, encoded),
        "config": config,
        "fp8": fp8,
        "plain": plain,
    }


@pytest.fixture
def release(tmp_path, debug_config: ModelConfig) -> dict:
    return _release(tmp_path, debug_config)


def test_fp8_release_loads_as_the_weights_it_encodes(release, tmp_path) -> None:
    assert sum(t.dtype == torch.float8_e4m3fn for t in release["fp8"].values()) > 100
    loaded = DeepSeekV3.from_pretrained(release["fp8_dir"])
    expected = DeepSeekV3.from_pretrained(release["encoded_dir"])
    ours, theirs = loaded.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Quantization really happened: close to the original weights, not equal to them.
    original = release["plain"]["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    got = ours["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert not torch.equal(got, original)
    assert ((got - original).norm() / original.norm()).item() < 0.05
    # Saving writes the plain layout: float weights, no scales, no quantization_config.
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in resaved)
    assert all(t.dtype == torch.float32 for t in resaved.values() if t.is_floating_point())
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_broken_fp8_checkpoints_are_refused(release, tmp_path) -> None:
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    scale = name + "_scale_inv"
    fp8 = release["fp8"]
    cases = {
        "missing_scale": ({k: v for k, v in fp8.items() if k != scale}, "is missing"),
        "bad_scale_shape": (fp8 | {scale: torch.ones(1, 1)}, "expected float scales"),
        "orphan_scale": ({k: v for k, v in fp8.items() if k != name}, "has no weight"),
    }
    config = release["config"] | {"quantization_config": FP8_CONFIG}
    for case, (tensors, message) in cases.items():
        with pytest.raises(CheckpointFormatError, match=message):
            DeepSeekV3.from_pretrained(_write(tmp_path / case, config, tensors))
    for case, quant, field in [
        ("non_square", FP8_CONFIG | {"weight_block_size": [16, 32]}, "weight_block_size"),
        ("other_method", FP8_CONFIG | {"quant_method": "gptq"}, "quant_method"),
    ]:
        directory = _write(tmp_path / case, release["config"] | {"quantization_config": quant}, fp8)
        with pytest.raises(ConfigError, match=field):
            DeepSeekV3.from_pretrained(directory)


def test_fp8_release_logits_match_transformers(tmp_path, debug_config: ModelConfig) -> None:
    """An independent reader of the same FP8 checkpoint: transformers' fine-grained FP8 dequantization.

    Its dequantizer refuses partial blocks (a weight must divide into whole blocks), so this uses
    8x8 blocks, which divide every debug-flavour projection.
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load any quantized checkpoint
    release = _release(tmp_path, debug_config, block_edge=8)
    ours = DeepSeekV3.from_pretrained(release["fp8_dir"]).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
        release["fp8_dir"],
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=(8, 8)),
        dtype=torch.float32,
    ).eval()
    ids = torch.randint(0, debug_config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-4
