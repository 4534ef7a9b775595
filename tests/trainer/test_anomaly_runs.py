"""Injected faults on 2-process runs (expert parallel 2) through the checkpoint service, each detected at
the step it happens, reported in `TrainerService.Status` and `metrics.jsonl`, and handled by the policy:
- a batch poisoned to NaN at step 7 (on rank 1 only: rank 0 learns of it through the agreed flags) under
  `rollback`: back to the step-4 checkpoint, the data window through the bad batch skipped, and the run
  ends within 1% of a clean run's final loss;
- a loss spike injected at step 9 under `skip`: that update dropped, the run goes on, healthy again;
- rank 1 sleeping before step 6, past a 4 s `stall_timeout`: every rank's watchdog exits (code 142) within
  the timeout, torchrun restarts the group, and it resumes from the step-4 checkpoint and completes.
The faults come from the test hook `DSV3_FAULT_INJECTION` (dsv3.trainer.faults)."""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time
from pathlib import Path

import grpc

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import trainer_pb2, trainer_pb2_grpc
from dsv3.serving.ports import free_port

STEPS = 12
COMMON = ["--steps", str(STEPS), "--ep", "2", "--checkpoint-interval", "4", "--spike-warmup", "4"]


class StatusWatcher:
    """Polls `TrainerService.Status` on a port from a thread; keeps every answer with its time."""

    def __init__(self, port: int) -> None:
        self.port, self.seen = port, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Reconnect quickly: the default backoff grows to seconds while the launch starts up, long enough
        # to miss a short run entirely.
        fast = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=fast) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            while not self._stop.is_set():
                try:
                    reply = stub.Status(trainer_pb2.TrainerStatusRequest(), timeout=1)
                    self.seen.append((time.monotonic(), reply))
                except grpc.RpcError:
                    pass  # not up yet, or gone
                time.sleep(0.02)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def _held_out_after(stderr: str) -> list[float]:
    return [float(x) for x in re.findall(r"done: \d+ steps, held-out loss \S+ -> (\S+)", stderr)]


def test_poisoned_batch_rolls_back_and_a_loss_spike_is_skipped(
    tmp_path: Path, checkpoint_server, launch
) -> None:
    address = checkpoint_server.address
    nan_port, spike_port = free_port(), free_port()

    def args(job: str) -> list[str]:
        return [*COMMON, "--checkpoint", address, "--job", job, "--output-dir", str(tmp_path / job)]

    runs = [
        (args("clean"), {}),
        (
            [*args("poisoned"), "--anomaly-policy", "rollback", "--max-rollbacks", "1",
             "--status-port", str(nan_port)],
            {"DSV3_FAULT_INJECTION": "nan@7:rank=1:attempt=any"},
        ),
        (
            [*args("spiked"), "--anomaly-policy", "skip", "--anomaly-clear-steps", "2",
             "--status-port", str(spike_port)],
            {"DSV3_FAULT_INJECTION": "spike@9:factor=30:attempt=any"},
        ),
    ]  # fmt: skip
    watchers = [StatusWatcher(nan_port), StatusWatcher(spike_port)]
    try:
        result = launch.run_many(2, runs, tmp_path)
    finally:
        nan_seen, spike_seen = (w.stop() for w in watchers)

    # NaN at step 7: detected there on both ranks, rolled back to step 4, the window [32, 56) skipped.
    poisoned = launch.metrics(tmp_path / "poisoned")
    flagged = [r for r in poisoned if r["anomalies"]]
    assert [(r["step"], r["anomalies"], r["action"]) for r in flagged] == [(7, ["NONFINITE"], "ROLLED_BACK")]
    assert [r["step"] for r in poisoned] == [*range(1, 8), *range(5, STEPS + 1)]
    assert (
        "rollback 1/1: restored checkpoint step 4 after NONFINITE at step 7; skipping sequences [32, 56)"
        in (result.stderr)
    )
    assert re.search(
        r"anomaly step=7 kind=NONFINITE kinds=NONFINITE action=ROLLED_BACK policy=rollback rank=0",
        result.stderr,
    )
    assert re.search(r"anomaly step=7 kind=NONFINITE .* rank=1", result.stderr)
    anomalies = [s.last_anomaly for _, s in nan_seen if s.HasField("last_anomaly")]
    assert anomalies and {(a.kind, a.step, a.action) for a in anomalies} == {("NONFINITE", 7, "ROLLED_BACK")}
    assert nan_seen[-1][1].rollbacks == 1 and nan_seen[-1][1].step == STEPS
    clean, rolled = launch.losses(tmp_path / "clean"), launch.losses(tmp_path / "poisoned")
    first_pass = [r["loss"] for r in poisoned[:6]]  # before the poison: the clean run exactly
    assert all(abs(clean[s] - first_pass[s - 1]) <= 1e-6 * clean[s] for s in range(1, 7))
    assert all(math.isfinite(rolled[s]) for s in range(1, STEPS + 1))  # no NaN reached the weights
    # The final loss, on the same held-out sequences (the last training batches differ: the rolled-back
    # run trained on the data after the skipped window), within 1% of the clean run's.
    held_clean, held_rolled, _ = _held_out_after(result.stderr)
    assert abs(held_rolled - held_clean) / held_clean <= 0.01, (held_rolled, held_clean)
    with CheckpointClient(address, retries=1) as client:
        assert client.latest("poisoned") == STEPS

    # Loss spike at step 9 under skip: that update dropped, every other step trained, healthy again.
    spiked = launch.metrics(tmp_path / "spiked")
    assert [(r["step"], r["anomalies"], r["action"]) for r in spiked if r["anomalies"]] == [
        (9, ["LOSS_SPIKE"], "SKIPPED")
    ]
    assert [r["step"] for r in spiked] == list(range(1, STEPS + 1))
    assert spiked[8]["loss"] > 10 * spiked[7]["loss"]
    statuses = [s for _, s in spike_seen]
    spike_reports = [s for s in statuses if s.HasField("last_anomaly")]
    assert spike_reports and spike_reports[0].last_anomaly.kind == "LOSS_SPIKE"
    assert spike_reports[0].last_anomaly.step == 9 and spike_reports[0].last_anomaly.action == "SKIPPED"
    assert "robust z-score" in spike_reports[0].last_anomaly.message
    assert any(s.degraded for s in spike_reports), "the spike was never reported as degraded"
    assert not statuses[-1].degraded and statuses[-1].skipped_steps == 1 and statuses[-1].anomalies == 1
    # The skipped update left the weights as they were: steps 1-8 equal the clean run's; from step 10 on
    # the run trains on from step 8's weights (it differs from the clean run, which applied step 9).
    spiked_losses = launch.losses(tmp_path / "spiked")
    assert all(abs(clean[s] - spiked_losses[s]) <= 1e-6 * clean[s] for s in range(1, 9))
    assert spiked_losses[10] != clean[10]


def test_a_stalled_rank_makes_every_rank_exit_and_torchrun_resumes_from_the_checkpoint(
    tmp_path: Path, checkpoint_server, launch
) -> None:
    port, out = free_port(), tmp_path / "stall"
    timeout = 4.0
    command = launch.command(
        2,
        ["--steps", "8", "--ep", "2", "--checkpoint", checkpoint_server.address, "--checkpoint-interval", "4",
         "--job", "stalled", "--output-dir", str(out), "--status-port", str(port),
         "--stall-timeout", str(timeout)],
        max_restarts=1,
    )  # fmt: skip
    env = dict(launch.env(), DSV3_FAULT_INJECTION="sleep@6:rank=1:seconds=600")
    watcher = StatusWatcher(port)
    try:
        trainer = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    finally:
        seen = watcher.stop()
    assert trainer.returncode == 0, trainer.stderr[-4000:]
    err = trainer.stderr
    assert "exitcode: 142" in err or "exitcode  : 142" in err, err[-3000:]
    assert re.search(r"anomaly step=6 kind=STALL kinds=STALL action=EXITED policy=warn rank=1", err)
    assert re.findall(r"resumed job=stalled from step (\d+)", err) == ["4"]
    stall = [(t, s) for t, s in seen if s.HasField("last_anomaly") and s.last_anomaly.kind == "STALL"]
    assert stall, "the stall never showed in the status"
    assert stall[0][1].last_anomaly.step == 6 and stall[0][1].last_anomaly.action == "EXITED"
    last_step5 = max(t for t, s in seen if s.step == 5 and not s.HasField("last_anomaly"))
    assert stall[0][0] - last_step5 <= timeout + 1.5, stall[0][0] - last_step5  # within its timeout
    records = launch.metrics(out)
    assert {"step": 6, "anomalies": ["STALL"], "action": "EXITED"}.items() <= next(
        r for r in records if r["anomalies"]
    ).items()
    assert sorted(launch.losses(out)) == list(range(1, 9))
    assert seen[-1][1].step == 8 and seen[-1][1].restarts == 1  # the restarted group finished
