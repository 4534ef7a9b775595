"""Router + shards serving a checkpoint from the checkpoint service (dense part and experts by name)."""

from __future__ import annotations

import torch

from dsv3.checkpoint import CheckpointClient
from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.hf_names import to_hf_state_dict
from dsv3.router import RouterClient


def test_serves_a_checkpoint_from_the_checkpoint_service(spawn, tmp_path) -> None:
    torch.manual_seed(8)
    model = DeepSeekV3(ModelConfig.flavour("debug")).eval()
    ckpt = spawn("dsv3.checkpoint", "--data-dir", str(tmp_path / "ckpt"), "--min-free-bytes", "0")
    with CheckpointClient(ckpt.address) as client:
        client.save("run", 3, {k: torch.zeros_like(v) for k, v in to_hf_state_dict(model).items()}, part=0)
        client.commit("run", 3, num_parts=1)
        client.save("run", 7, to_hf_state_dict(model), part=0)  # the latest: what must be served
        client.commit("run", 7, num_parts=1)
    shards = [
        spawn("dsv3.expert_shard", "--capacity", "32", "--device", "cpu", "--checkpoint", ckpt.address)
        for _ in range(2)
    ]
    router = spawn(
        "dsv3.router",
        "--checkpoint",
        ckpt.address,
        "--job",
        "run",
        "--model-config",
        "debug",
        "--device",
        "cpu",
        "--max-length",
        "64",
        "--shards",
        ",".join(s.address for s in shards),
    )
    with RouterClient(router.address) as client:
        ids = torch.randint(0, 320, (2, 16))
        with torch.no_grad():
            assert (client.forward(ids) - model(ids).logits).abs().max().item() <= 1e-5
        prompt = ids[0, :5].tolist()
        assert client.generate(prompt, 5) == generate(model, torch.tensor([prompt]), 5)[0, 5:].tolist()
