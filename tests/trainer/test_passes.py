"""Concurrent forward/backward passes (`dsv3.trainer.passes`): the same gradients as one pass over the
whole micro-batch up to rounding, bitwise the same from run to run whichever thread finishes first, each
pass on its share of the torch threads, and a trainer run with them gives the losses of one without."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.loss import language_model_loss
from dsv3.trainer.config import TrainConfig
from dsv3.trainer.loop import train
from dsv3.trainer.passes import ConcurrentPasses, auto_passes


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(ModelConfig.flavour("debug")).train()


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 32), generator=torch.Generator().manual_seed(1))


def _grads(model: DeepSeekV3, passes: int, ids: torch.Tensor, rounds: int = 1, threads_seen=None) -> list:
    """Gradients of the mean loss over `rounds` micro-batches (each the same `ids`), `passes` at a time."""
    runner = ConcurrentPasses(model, passes)
    model.zero_grad(set_to_none=True)

    def loss_of(part: torch.Tensor):
        if threads_seen is not None:
            threads_seen.append(torch.get_num_threads())
        loss = language_model_loss(model(part), part, 0.3, 0.01).total
        return loss / (passes * rounds), None

    try:
        for _ in range(rounds):
            assert runner.run(ids, loss_of) == [None] * passes
    finally:
        runner.close()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("rounds", [1, 2], ids=["onto-empty-grads", "onto-existing-grads"])
def test_two_passes_match_one_pass_and_repeat_bitwise(two_threads, rounds: int) -> None:
    model = _model()
    ids = _ids(4)
    one = _grads(model, 1, ids, rounds)
    seen: list[int] = []
    two = [_grads(model, 2, ids, rounds, seen) for _ in range(4)]
    assert seen and set(seen) == {1}  # each pass on its share of the 2 threads
    assert torch.get_num_threads() == 2  # restored after the passes
    assert len(two[0]) == len(one)
    for a, b in zip(one, two[0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for again in two[1:]:  # the sum does not depend on which thread finished first
        assert all(torch.equal(a, b) for a, b in zip(two[0], again, strict=True))


def test_four_passes_sum_in_slice_order(two_threads) -> None:
    """More than two passes take the autograd.grad path: the slices' gradients added in slice order."""
    model = _model()
    ids = _ids(8)
    four = _grads(model, 4, ids)
    params = [p for p in model.parameters()]
    expected = None
    for part in ids.chunk(4):
        model.zero_grad(set_to_none=True)
        (language_model_loss(model(part), part, 0.3, 0.01).total / 4).backward()
        grads = [p.grad.clone() for p in params if p.grad is not None]
        expected = grads if expected is None else [e + g for e, g in zip(expected, grads, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(expected, four, strict=True))


def test_auto_passes_only_where_they_can_run() -> None:
    assert auto_passes("cpu", 1, 4, 2) == 2
    assert auto_passes("cpu", 2, 4, 2) == 1  # expert parallel: all-to-alls inside the pass
    assert auto_passes("cpu", 1, 3, 2) == 1  # the micro-batch does not split in two
    assert auto_passes("cpu", 1, 4, 1) == 1  # one thread: nothing to share
    assert auto_passes("cuda", 1, 4, 8) == 1
    with pytest.raises(ValueError, match="passes must be >= 1"):
        ConcurrentPasses(_model(), 0)


def test_trainer_with_concurrent_passes_gives_the_losses_of_one_pass(
    tmp_path: Path, two_threads, caplog: pytest.LogCaptureFixture, launch
) -> None:
    base = dict(
        model="debug", steps=4, batch=8, seq_len=32, progress="none", warmup_steps=1, eval_sequences=0,
        mtp_weight=0.3, balance_alpha=0.01, bias_gamma=0.01,
    )  # fmt: skip
    runs = {
        "one": {"concurrent_passes": 1},
        "auto": {},
        "auto-again": {},
        "micro2-passes2": {"micro_batches": 2, "concurrent_passes": 2},
    }
    losses = {}
    for name, extra in runs.items():
        with caplog.at_level(logging.INFO, logger="dsv3.trainer"):
            caplog.clear()
            train(TrainConfig(**base, **extra, output_dir=tmp_path / name))
        assert gc.get_freeze_count() == 0  # the run froze set-up's objects, then thawed them
        passes = 1 if name == "one" else 2
        assert f"concurrent passes {passes}" in caplog.text, name
        losses[name] = launch.losses(tmp_path / name)
    steps = range(1, 5)
    assert sorted(losses["one"]) == list(steps) and losses["one"][4] < losses["one"][1]
    for name in ("auto", "micro2-passes2"):
        assert sorted(losses[name]) == list(steps), name
        assert launch.max_rel_diff(losses["one"], losses[name], steps) <= 1e-5, name
    assert losses["auto"] == losses["auto-again"]  # bitwise reproducible


def _openmp():
    """torch's OpenMP runtime, for its per-thread count (what MKL's GEMMs follow)."""
    import ctypes
    import os

    libraries = {
        line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line
    }
    if not libraries or (os.cpu_count() or 1) < 2:
        pytest.skip("needs torch's libgomp and at least 2 CPUs")
    return ctypes.CDLL(sorted(libraries)[0])


def test_each_pass_thread_sets_its_own_openmp_count(two_threads) -> None:
    """A thread that never set its OpenMP count starts from the process default (one per CPU), and MKL's
    GEMMs follow that count rather than torch's: each pass thread must set its share itself."""
    openmp = _openmp()
    runner = ConcurrentPasses(torch.nn.Linear(2, 2), 2)
    seen: list[int] = []

    def loss_of(part: torch.Tensor):
        seen.append(openmp.omp_get_max_threads())
        return runner.params[0].sum() + part.sum() * 0, None

    try:
        for _ in range(2):
            runner.run(torch.zeros(2, 2), loss_of)
    finally:
        runner.close()
    assert seen == [1, 1, 1, 1]
    assert openmp.omp_get_max_threads() == 2  # the main thread keeps its count


def test_a_failing_pass_is_raised_after_every_pass_has_finished(two_threads) -> None:
    """No pass may still be adding into `.grad` once `run` has raised the other's error."""
    import threading
    import time

    model = torch.nn.Linear(3, 1)
    runner = ConcurrentPasses(model, 2)
    finished = threading.Event()

    def loss_of(part: torch.Tensor):
        if part[0, 0] > 0:  # the second slice
            time.sleep(0.2)
            finished.set()
            return model(part).sum(), None
        raise RuntimeError("bad batch")

    ids = torch.cat([-torch.ones(1, 3), torch.ones(1, 3)])
    try:
        with pytest.raises(RuntimeError, match="bad batch"):
            runner.run(ids, loss_of)
        assert finished.is_set()
        assert torch.get_num_threads() == 2
    finally:
        runner.close()
