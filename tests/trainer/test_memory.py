"""Activation checkpointing (each mode) and micro-batching (N = 1, 2, 4 for the same global batch) leave
the losses unchanged step by step (float32, relative <= 1e-5), on 1 process and on 2 (expert parallel 2,
through the all-to-all). A wrong loss scale, loads not summed over micro-batches before the bias update,
or a recomputation that differs from the forward breaks it at the first step or the one after."""

from __future__ import annotations

from pathlib import Path

from dsv3.trainer.config import TrainConfig
from dsv3.trainer.loop import train

STEPS = 5
SMALL = ["--steps", str(STEPS), "--warmup-steps", "2", "--eval-sequences", "0"]
VARIANTS = {
    "full": {"activation_checkpointing": "full"},
    "moe": {"activation_checkpointing": "moe"},
    "micro2": {"micro_batches": 2},
    "micro4": {"micro_batches": 4},
}


def test_one_process_every_mode_and_micro_batch_count_gives_the_plain_losses(tmp_path: Path, launch) -> None:
    base = dict(
        model="debug", steps=STEPS, batch=8, seq_len=32, progress="none", warmup_steps=2, eval_sequences=0,
        mtp_weight=0.3, balance_alpha=0.01, bias_gamma=0.01,
    )  # fmt: skip
    runs = {}
    for name, extra in {"plain": {}, **VARIANTS}.items():
        train(TrainConfig(**base, **extra, output_dir=tmp_path / name))
        runs[name] = launch.losses(tmp_path / name)
        assert sorted(runs[name]) == list(range(1, STEPS + 1)), name
    for name in VARIANTS:
        assert launch.max_rel_diff(runs["plain"], runs[name], range(1, STEPS + 1)) <= 1e-5, name
    assert runs["plain"][STEPS] < runs["plain"][1]  # it trained: the bias updates and steps mattered


def test_two_processes_expert_parallel_with_recompute_and_micro_batches_give_the_plain_losses(
    tmp_path: Path, launch
) -> None:
    variants = {
        "plain": [],
        "full-micro2": ["--activation-checkpointing", "full", "--micro-batches", "2"],
        "moe-micro4": ["--activation-checkpointing", "moe", "--micro-batches", "4"],
    }
    runs = [
        ([*SMALL, "--ep", "2", "--output-dir", str(tmp_path / n), *extra], {})
        for n, extra in variants.items()
    ]
    result = launch.run_many(2, runs, tmp_path)
    assert "in 4 micro-batches, activation checkpointing moe" in result.stderr
    losses = {name: launch.losses(tmp_path / name) for name in variants}
    for name in variants:
        assert launch.max_rel_diff(losses["plain"], losses[name], range(1, STEPS + 1)) <= 1e-5, name
