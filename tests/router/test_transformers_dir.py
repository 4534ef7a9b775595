"""Router + 2 shards serving a directory written by transformers' `DeepseekV3ForCausalLM.save_pretrained`."""

from __future__ import annotations

import threading

import pytest
import torch

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient

transformers = pytest.importorskip("transformers")


def test_transformers_directory_forward_and_greedy_generate(spawn, tmp_path) -> None:
    config = ModelConfig.flavour("debug").replace(num_nextn_predict_layers=0).to_hf_config()
    torch.manual_seed(4)
    reference = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config)).eval()
    with torch.no_grad():
        for layer in reference.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.05)
    reference.save_pretrained(tmp_path / "hf")
    model = DeepSeekV3.from_pretrained(tmp_path / "hf").eval()
    shards = [spawn("dsv3.expert_shard", "--capacity", "32", "--device", "cpu") for _ in range(2)]
    router = spawn(
        "dsv3.router",
        "--model-dir",
        str(tmp_path / "hf"),
        "--device",
        "cpu",
        "--max-length",
        "64",
        "--shards",
        ",".join(s.address for s in shards),
    )
    with RouterClient(router.address) as client:
        ids = torch.randint(0, 320, (2, 20))
        logits = client.forward(ids)
        with torch.no_grad():
            assert (logits - model(ids).logits).abs().max().item() <= 1e-5
            assert (logits - reference(ids).logits).abs().max().item() <= 1e-4
        prompts = [torch.randint(0, 320, (n,)).tolist() for n in (2, 9, 14)]
        expected = [generate(model, torch.tensor([p]), 6)[0, len(p) :].tolist() for p in prompts]
        results: list[list[int] | None] = [None] * len(prompts)
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, client.generate(prompts[i], 6)))
            for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == expected
