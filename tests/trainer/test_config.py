"""Settings: `--config` file < DSV3_* env < flags; bad values refused with the field named, before any
process group starts (the CLI exits with the message, no torchrun needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.model import ModelConfig
from dsv3.trainer.config import Layout, SettingsError, TrainConfig, parse_settings


def test_flags_beat_env_which_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"steps": 7, "lr": 0.01, "batch": 4, "bf16": True, "seq-len": 48}))
    monkeypatch.setenv("DSV3_LR", "0.02")
    monkeypatch.setenv("DSV3_BATCH", "6")
    config = parse_settings(["--config", str(path), "--batch", "12", "--ep", "2", "--checkpoint", "h:1"])
    assert (config.steps, config.lr, config.batch, config.bf16, config.seq_len) == (7, 0.02, 12, True, 48)
    assert (config.ep, config.checkpoint) == (2, "h:1")
    monkeypatch.setenv("DSV3_CONFIG", str(path))
    assert parse_settings([]).steps == 7


def test_the_flag_names_other_parts_rely_on_exist() -> None:
    names = [
        "--model",
        "--steps",
        "--batch",
        "--seq-len",
        "--lr",
        "--ep",
        "--seed",
        "--data",
        "--tokenizer",
        "--output-dir",
        "--checkpoint",
        "--job",
        "--checkpoint-interval",
        "--keep-last",
        "--export",
        "--status-port",
        "--fp8",
    ]
    result = subprocess.run([sys.executable, "-m", "dsv3.trainer", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    missing = [n for n in names if n not in result.stdout]
    assert missing == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"batch": -1}, "batch"),
        ({"lr": float("nan")}, "lr"),
        ({"beta2": 1.0}, "beta2"),
        ({"seq_len": 2}, "seq_len"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"status_port": 70000}, "status_port"),
        ({"progress": "fancy"}, "progress"),
        ({"data": "/no/such/corpus"}, "data"),
        ({"tokenizer": "/no/tokenizer.json"}, "tokenizer"),
        ({"job": "a/b"}, "job"),
        ({"fp8": True, "device": "cpu"}, "fp8"),
        ({"decay_start": -5}, "decay_start"),
        ({"resume_from": "step-3"}, "resume_from"),
        ({"concurrent_passes": -1}, "concurrent_passes"),
    ],
)
def test_bad_settings_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{field}\b"):
        TrainConfig(**changes)


def test_layout_checks_against_world_size_and_model() -> None:
    model = ModelConfig.flavour("debug")  # 16 routed experts
    assert Layout.of(TrainConfig(ep=2, batch=8), 4, 3, model) == Layout(4, 3, 2, 2)
    assert (Layout(4, 3, 2, 2).dp_rank, Layout(4, 3, 2, 2).ep_rank) == (1, 1)
    with pytest.raises(SettingsError, match=r"^ep \(3\) x dp"):
        Layout.of(TrainConfig(ep=3, batch=12), 4, 0, model)
    with pytest.raises(SettingsError, match=r"^ep \(3\) must divide"):
        Layout.of(TrainConfig(ep=3, batch=12), 3, 0, model)
    with pytest.raises(SettingsError, match=r"^batch \(6\)"):
        Layout.of(TrainConfig(ep=2, batch=6), 4, 0, model)
    with pytest.raises(SettingsError, match=r"^ep \(2\) x dp \(3\)"):
        Layout.of(TrainConfig(ep=2, dp=3, batch=12), 4, 0, model)
    with pytest.raises(SettingsError, match=r"^concurrent_passes \(2\) needs ep 1"):
        Layout.of(TrainConfig(ep=2, batch=8, concurrent_passes=2), 2, 0, model)
    with pytest.raises(SettingsError, match=r"^concurrent_passes \(3\) must divide each micro-batch's 2 "):
        Layout.of(TrainConfig(batch=8, micro_batches=2, concurrent_passes=3), 2, 0, model)
    assert Layout.of(TrainConfig(batch=8, micro_batches=2, concurrent_passes=2), 2, 0, model).dp == 2


def test_schedule_warms_up_holds_then_decays_to_the_floor() -> None:
    config = TrainConfig(lr=1.0, steps=100, warmup_steps=10, decay_start=50, decay_steps=40, min_lr_ratio=0.1)
    assert config.lr_at(1) == pytest.approx(0.1) and config.lr_at(10) == 1.0
    assert config.lr_at(30) == config.lr_at(50) == 1.0
    assert config.lr_at(70) == pytest.approx(0.55)
    assert config.lr_at(90) == config.lr_at(100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ep", "3"], "ep (3) x dp (world/ep) must equal the world size (1)"),
        (["--model", "nope"], "model: unknown model flavour 'nope'"),
        (["--steps", "0"], "steps must be > 0"),
        (["--batch", "many"], "--batch: invalid int value"),
    ],
)
def test_the_cli_refuses_bad_settings_before_starting(tmp_path: Path, argv: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dsv3.trainer", "--output-dir", str(tmp_path), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"stepz": 3}))
    result = subprocess.run(
        [sys.executable, "-m", "dsv3.trainer", "--config", str(path)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "stepz: unknown setting" in result.stderr
