"""The `dsv3` command, the local demo loop, generation and the byte corpus."""

import subprocess
import sys

import pytest
import torch

from dsv3.cli import main
from dsv3.corpus import ByteBatches, decode, encode, stdlib_bytes
from dsv3.demo import DemoSettings, run_demo
from dsv3.generation import generate
from dsv3.model import DeepSeekV3


def test_info_counts_671b(capsys) -> None:
    assert main(["info", "671b"]) == 0
    out = capsys.readouterr().out
    assert "671.0" in out and "activated/token" in out


def test_unknown_flavour_is_a_clear_cli_error(capsys) -> None:
    assert main(["info", "nope"]) == 2
    assert "unknown model flavour 'nope'" in capsys.readouterr().err


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dsv3.cli", "info", "16b"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "15.7" in result.stdout


def test_corpus_is_the_stdlib_and_round_trips() -> None:
    data = stdlib_bytes(max_bytes=100_000)
    assert len(data) == 100_000 and b"def " in data
    assert decode(encode("héllo")) == "héllo"
    batches = ByteBatches(data, seq_len=32)
    assert batches.sample(4).shape == (4, 32) and int(batches.sample(4).max()) < 256
    with pytest.raises(ValueError, match="too short"):
        ByteBatches(b"x" * 20, seq_len=32).sample(1)


def test_greedy_generation_equals_repeated_full_forward(debug_model: DeepSeekV3) -> None:
    prompt = torch.randint(0, 256, (2, 5))
    generated = generate(debug_model, prompt, max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, debug_model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_generation_stops_at_eos_and_rejects_bad_input(debug_model: DeepSeekV3) -> None:
    with torch.no_grad():
        debug_model.model.norm.weight.zero_()  # all logits 0: argmax is token 0, used as EOS here
    out = generate(debug_model, torch.ones(2, 3, dtype=torch.long), max_new_tokens=10, eos_token_id=0)
    assert out.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert generate(debug_model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=4).shape == (1, 7)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(debug_model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_demo_learns_and_writes_a_loadable_checkpoint(tmp_path) -> None:
    lines: list[str] = []
    summary = run_demo(
        DemoSettings(steps=12, batch=4, seq_len=64, new_tokens=8, output_dir=tmp_path), log=lines.append
    )
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"] - 0.5
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert DeepSeekV3.from_pretrained(tmp_path).config.num_hidden_layers == 3
    assert any(line.startswith("sample:") for line in lines)
