"""Checkpoints through the real checkpoint service: layout-independent (saved on 2 processes, resumed on 1,
then on 4), release names for every tensor, a model that `DeepSeekV3` loads whole and a shard loads by
expert."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsv3.checkpoint import CheckpointClient
from dsv3.model import DeepSeekV3, ModelConfig

STEPS = 30


def _exported(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_resume_on_another_world_size_continues_the_same_losses(tmp_path: Path, checkpoint_server, launch):
    address = checkpoint_server.address
    common = ["--checkpoint", address, "--checkpoint-interval", "10"]
    ref = tmp_path / "ref"
    launch.run(2, [*common, "--steps", str(STEPS), "--ep", "2", "--job", "ws-ref", "--output-dir", str(ref),
                   "--export", str(ref / "hf")])  # fmt: skip
    out = tmp_path / "resumed"
    job = ["--job", "ws", "--output-dir", str(out)]
    launch.run(2, [*common, *job, "--steps", "10", "--ep", "2"])  # saved on 2 ranks (ep 2) at step 10
    one = launch.run(1, [*common, *job, "--steps", "20"])  # resumed on 1 process, saved at 20
    assert "resumed job=ws from step 10 (saved on 2 ranks)" in one.stderr
    four = launch.run(4, [*common, *job, "--steps", str(STEPS), "--ep", "2", "--export", str(out / "hf")])
    assert "resumed job=ws from step 20 (saved on 1 ranks)" in four.stderr
    assert launch.max_rel_diff(launch.losses(ref), launch.losses(out), range(1, STEPS + 1)) <= 1e-4
    final_ref, final = _exported(ref / "hf"), _exported(out / "hf")
    assert final_ref.keys() == final.keys()
    for name, tensor in final_ref.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-3, atol=1e-4, msg=name)

    with CheckpointClient(address) as client:
        assert client.list("ws") == [10, 20, 30]
        info = client.checkpoints("ws")[-1]
        assert len(info.parts) >= 4  # one part per rank (a part may be split in segments)
        # An expert shard loads exactly one expert by its release name, the full tensor.
        name = "model.layers.2.mlp.experts.13.down_proj.weight"
        one_expert = client.load("ws", 30, names=[name])
        assert torch.equal(one_expert[name], final[name])
        # The weights alone, as stored, are a Hugging Face checkpoint for DeepSeekV3.
        stored = client.load("ws", 30)
    weights = {n: t for n, t in stored.items() if not n.startswith(("optimizer.", "trainer."))}
    assert {n for n in stored if n.startswith("optimizer.exp_avg.")}  # optimizer state by name
    assert {n for n in stored if n.startswith("trainer.rng.")} == {f"trainer.rng.{r}" for r in range(4)}
    directory = tmp_path / "from-service"
    directory.mkdir()
    ModelConfig.flavour("debug").save(directory)
    save_file({n: t.contiguous() for n, t in weights.items()}, directory / "model.safetensors")
    model = DeepSeekV3.from_pretrained(directory)
    exported = DeepSeekV3.from_pretrained(out / "hf")
    for (name, a), (_, b) in zip(model.state_dict().items(), exported.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_checkpoint_address_fails_fast_naming_it(tmp_path: Path, launch) -> None:
    import subprocess

    result = subprocess.run(
        launch.command(1, ["--steps", "2", "--checkpoint", "127.0.0.1:1", "--output-dir", str(tmp_path)]),
        capture_output=True, text=True, timeout=120, env=launch.env(),
    )  # fmt: skip
    assert result.returncode != 0
    assert "checkpoint: the checkpoint service at 127.0.0.1:1 answered UNAVAILABLE" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
