"""Trainer test fixtures: real torchrun launches of `dsv3.trainer` and a real checkpoint server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_checkpoint_fixtures", ROOT / "tests/checkpoint/conftest.py")
_checkpoint_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checkpoint_fixtures)
CheckpointServer = _checkpoint_fixtures.CheckpointServer

# Small, fast and still everything on: debug flavour, MTP, balance loss, bias updates, warmup and decay.
BASE = [
    "--model",
    "debug",
    "--batch",
    "8",
    "--seq-len",
    "32",
    "--progress",
    "log",
    "--log-interval",
    "10",
    "--warmup-steps",
    "5",
    "--decay-start",
    "15",
    "--decay-steps",
    "20",
    "--collective-timeout",
    "30",
    "--eval-sequences",
    "8",
    "--mtp-weight",
    "0.3",
    "--balance-alpha",
    "0.01",
    "--bias-gamma",
    "0.01",
]


def trainer_command(world: int, args: list[str], max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run ... -m dsv3.trainer` for `world` local processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        f"--max-restarts={max_restarts}", "-m", "dsv3.trainer", *BASE, *args,
    ]  # fmt: skip


def run_many(world: int, runs: list[tuple[list[str], dict[str, str]]], tmp: Path, timeout: float = 300):
    """Several trainer runs (argv after BASE, extra env) in one torchrun launch (multi_run.py)."""
    spec = tmp / "runs.json"
    spec.write_text(json.dumps([{"argv": [*BASE, *argv], "env": env} for argv, env in runs]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        "--max-restarts=0", str(Path(__file__).with_name("multi_run.py")), str(spec),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=trainer_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def trainer_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_trainer(world: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        trainer_command(world, args), capture_output=True, text=True, timeout=timeout, env=trainer_env()
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again; a
    stall report, which has no loss, is not a step's loss)."""
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def max_rel_diff(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)


@pytest.fixture(scope="module")
def checkpoint_server(tmp_path_factory) -> Iterator[CheckpointServer]:
    """One checkpoint service (embedded index) for a module of tests with distinct job names."""
    server = CheckpointServer(tmp_path_factory.mktemp("ckpt") / "data").start()
    yield server
    server.stop()


class Launcher:
    """What the trainer tests share, handed out as the `launch` fixture (test modules import nothing)."""

    command = staticmethod(trainer_command)
    env = staticmethod(trainer_env)
    run = staticmethod(run_trainer)
    run_many = staticmethod(run_many)
    metrics = staticmethod(read_metrics)
    losses = staticmethod(losses_by_step)
    max_rel_diff = staticmethod(max_rel_diff)


@pytest.fixture
def launch() -> Launcher:
    return Launcher()
