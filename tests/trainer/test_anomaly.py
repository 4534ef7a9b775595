"""The anomaly tests as data (dsv3.trainer.anomaly), the fault-injection hook's parser, the stall watchdog
in a real child process, the settings that are refused, and a run whose rollbacks are exhausted."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3.trainer.anomaly import AnomalyDetector, AnomalyError, Health, Kind, Thresholds, robust_zscore
from dsv3.trainer.config import Layout, SettingsError, TrainConfig, parse_settings
from dsv3.trainer.faults import parse_faults
from dsv3.trainer.loop import train


def _warm(detector: AnomalyDetector, steps: int = 10) -> None:
    for i in range(steps):  # a falling loss with a little noise, steady gradient norms
        detector.accept(5.0 - 0.1 * i + 0.01 * (-1) ** i, 3.0 + 0.1 * (-1) ** i)


def test_nonfinite_loss_or_gradient_is_seen_from_the_first_step() -> None:
    detector = AnomalyDetector(Thresholds(warmup=10))
    assert detector.check(1, math.nan, 1.0, [0.1]).kinds == (Kind.NONFINITE,)
    assert detector.check(1, 5.0, math.inf, [0.1]).kind == Kind.NONFINITE
    assert detector.check(1, 5.0, 1.0, [0.1]) is None


def test_a_loss_spike_is_a_high_robust_zscore_and_a_falling_loss_never_is() -> None:
    detector = AnomalyDetector(Thresholds(spike_zscore=6.0, warmup=10, grad_norm_factor=0))
    detector.accept(4.0, 3.0)
    assert detector.check(2, 100.0, 3.0, [0.1]) is None  # not warm yet: no history to judge against
    detector = AnomalyDetector(Thresholds(spike_zscore=6.0, warmup=10, grad_norm_factor=0))
    _warm(detector)
    assert detector.check(11, 3.9, 3.0, [0.1]) is None
    assert detector.check(11, 0.5, 3.0, [0.1]) is None  # a sudden drop is not a spike
    spike = detector.check(11, 8.0, 3.0, [0.1])
    assert spike.kind == Kind.LOSS_SPIKE and spike.step == 11 and "robust z-score" in spike.message
    assert robust_zscore(8.0, list(detector.losses)) > 6.0 > robust_zscore(6.0, list(detector.losses))
    # A window of identical losses: the scale floor (0.1% of the median) keeps noise from being a spike.
    flat = AnomalyDetector(Thresholds(spike_zscore=6.0, warmup=3, grad_norm_factor=0))
    for _ in range(5):
        flat.accept(2.0, 1.0)
    assert flat.check(6, 2.01, 1.0, [0.1]) is None and flat.check(6, 2.1, 1.0, [0.1]).kind == Kind.LOSS_SPIKE


def test_gradient_norm_explosion_against_the_window_median() -> None:
    detector = AnomalyDetector(Thresholds(warmup=10, grad_norm_factor=10.0))
    _warm(detector)
    assert detector.check(11, 4.0, 29.0, [0.1]) is None
    found = detector.check(11, 4.0, 31.0, [0.1])
    assert found.kinds == (Kind.GRAD_NORM_EXPLOSION,) and "x the median" in found.message
    both = detector.check(11, 9.0, 31.0, [0.1])
    assert both.kinds == (Kind.LOSS_SPIKE, Kind.GRAD_NORM_EXPLOSION) and both.kind == Kind.LOSS_SPIKE


def test_expert_collapse_needs_the_max_vio_above_threshold_for_k_consecutive_steps() -> None:
    detector = AnomalyDetector(Thresholds(collapse_max_vio=2.0, collapse_steps=3))
    assert detector.check(1, 5.0, 1.0, [0.2, 2.5]) is None
    assert detector.check(2, 5.0, 1.0, [0.2, 2.5]) is None
    assert detector.check(3, 5.0, 1.0, [0.2, 1.0]) is None  # layer 1 recovered: counting starts over
    for step in (4, 5):
        assert detector.check(step, 5.0, 1.0, [0.2, 2.9]) is None
    collapse = detector.check(6, 5.0, 1.0, [0.2, 2.9])
    assert (
        collapse.kind == Kind.EXPERT_COLLAPSE
        and "gate 1" in collapse.message
        and "3 consecutive" in collapse.message
    )
    assert detector.check(7, 5.0, 1.0, [0.2, 2.9]) is None  # reported again only after another 3 steps


def test_health_is_degraded_until_enough_clean_steps_followed_the_anomaly() -> None:
    health = Health(clear_steps=2)
    assert not health.degraded
    health.record(AnomalyDetector(Thresholds()).check(4, math.nan, 1.0, []))
    assert health.degraded
    health.clean_step()
    assert health.degraded
    health.clean_step()
    assert not health.degraded and health.last.step == 4 and health.count == 1


def test_fault_injection_specs_parse_and_bad_ones_name_the_variable() -> None:
    faults = parse_faults("nan@7:rank=1, spike@9:factor=30:attempt=any,sleep@3:seconds=2")
    assert [(f.kind, f.step, f.rank, f.attempt, f.value) for f in faults] == [
        ("nan", 7, 1, 0, 0.0),
        ("spike", 9, None, None, 30.0),
        ("sleep", 3, None, 0, 2.0),
    ]
    for bad in ("boom@3", "nan@0", "nan@3:colour=red", "nan"):
        with pytest.raises(ValueError, match="DSV3_FAULT_INJECTION: bad entry"):
            parse_faults(bad)


def test_the_watchdog_ends_a_stalled_process_with_exit_code_142_after_reporting() -> None:
    child = (
        "import time\n"
        "from dsv3.trainer.watchdog import StallWatchdog\n"
        "w = StallWatchdog(0.5, lambda idle: print(f'stalled {idle!r}', flush=True), report_seconds=0.1)\n"
        "w.start()\n"
        "for _ in range(3):\n"
        "    time.sleep(0.3); w.beat()\n"  # beating: alive
        "with w.paused():\n"
        "    time.sleep(0.8)\n"  # paused: not a stall
        "print('alive', flush=True)\n"
        "time.sleep(30)\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert result.returncode == 142, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "alive" and lines[1] == "stalled" and 0.5 < float(lines[2]) < 1.5
    assert took < 20  # not the 30 s sleep


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"spike_zscore": -1.0}, "spike_zscore"),
        ({"grad_norm_factor": -2.0}, "grad_norm_factor"),
        ({"collapse_max_vio": float("nan")}, "collapse_max_vio"),
        ({"stall_timeout": -5.0}, "stall_timeout"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"collapse_steps": 0}, "collapse_steps"),
        ({"spike_window": 0}, "spike_window"),
        ({"spike_warmup": 60, "spike_window": 50}, "spike_warmup"),
        ({"micro_batches": 0}, "micro_batches"),
        ({"micro_batches": 3, "batch": 16}, "micro_batches"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing"),
        ({"anomaly_policy": "ignore"}, "anomaly_policy"),
        ({"anomaly_policy": "rollback"}, "anomaly_policy"),  # without a checkpoint service
    ],
)
def test_bad_settings_are_refused_with_the_field_named(changes: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=f"^{field}"):
        TrainConfig(**changes)


def test_micro_batches_must_divide_each_ranks_batch() -> None:
    config = TrainConfig(batch=8, micro_batches=4)
    model = config.model_config()
    assert Layout.of(config, 2, 0, model).world == 2
    with pytest.raises(SettingsError, match=r"^micro_batches \(4\) must divide each rank's batch"):
        Layout.of(config, 4, 0, model)


def test_the_flags_refuse_a_negative_threshold_naming_it(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--spike-zscore", "-3"])
    assert exited.value.code == 2
    assert "spike_zscore must be a finite number >= 0, got -3.0" in capsys.readouterr().err


def test_beyond_max_rollbacks_the_run_fails_with_the_reason(
    tmp_path: Path, checkpoint_server, monkeypatch
) -> None:
    monkeypatch.setenv("DSV3_FAULT_INJECTION", "nan@3")
    config = TrainConfig(
        model="debug", steps=6, batch=4, seq_len=32, progress="none", eval_sequences=0, warmup_steps=2,
        checkpoint=checkpoint_server.address, job="exhausted", anomaly_policy="rollback", max_rollbacks=0,
        output_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(AnomalyError, match=r"NONFINITE at step 3 after 0 rollbacks \(max_rollbacks 0\)"):
        train(config)
