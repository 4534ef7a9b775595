"""The `Degraded` condition follows the trainer's anomalies. A real trainer (one process, a small corpus)
has a loss spike injected at step 12 (test hook DSV3_FAULT_INJECTION, policy skip; only the spike test
on, so that batch-of-2 gradient noise cannot be a second anomaly) and serves `TrainerService.Status`;
the operator's real reconcile runs against the Kubernetes API emulator (KMock; worker pods created
there, their phase set by the test) and reads that status. Degraded appears with the reason and the
step, the job's state stays `Running` (the last condition), and Degraded turns False once the trainer
is healthy."""

from __future__ import annotations

import copy
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import kopf
import kubernetes
import yaml
from kube_emulator import kubeconfig, serve
from op_helpers import EXAMPLES

from dsv3.operator import conditions as cond
from dsv3.operator import handlers
from dsv3.operator.config import OperatorConfig
from dsv3.operator.kube import Kube
from dsv3.operator.trainer_status import read_trainer_status
from dsv3.serving.ports import free_port

CONFIG = OperatorConfig(checkpoint_address="dsv3-checkpoint:50051")


def _reconcile(kube: Kube, body: dict) -> None:
    """One reconcile; the status patch applied to `body` as the API server would."""
    patch = kopf.Patch()
    handlers.reconcile_training(kube, body, patch, CONFIG)
    body.setdefault("status", {}).update(copy.deepcopy(dict(patch.get("status") or {})))


def test_degraded_appears_with_the_anomaly_and_clears_when_training_is_healthy(
    tmp_path: Path, monkeypatch
) -> None:
    port = free_port()
    trainer = subprocess.Popen(
        [sys.executable, "-m", "dsv3.trainer", "--steps", "2000", "--batch", "2", "--seq-len", "32",
         "--data", os.__file__, "--status-port", str(port), "--output-dir", str(tmp_path / "run"),
         "--eval-sequences", "0",
         "--progress", "none", "--anomaly-policy", "skip", "--spike-warmup", "5",
         "--grad-norm-factor", "0",
         "--anomaly-clear-steps", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", DSV3_FAULT_INJECTION="spike@12:factor=50"),
    )  # fmt: skip
    monkeypatch.setattr(handlers, "worker_address", lambda owner, rank, p, cfg: f"127.0.0.1:{port}")
    try:
        with serve() as (_, kube_port):
            (tmp_path / "kubeconfig").write_text(kubeconfig(kube_port))
            kubernetes.config.load_kube_config(config_file=str(tmp_path / "kubeconfig"))
            kube = Kube(kubernetes.client.ApiClient())
            body = yaml.safe_load((EXAMPLES / "training-debug.yaml").read_text())
            body["metadata"].update(namespace="default", uid="uid-degraded", generation=1)
            _reconcile(kube, body)  # creates the worker pods in the emulator
            pods = kube.list("v1", "Pod", "default", "dsv3.dev/job=debug-run")
            assert len(pods) == 2
            for pod in pods:
                kube.patch("v1", "Pod", "default", pod["metadata"]["name"], {"status": {"phase": "Running"}})

            history: list[tuple[int, dict | None]] = []
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline and trainer.poll() is None:
                _reconcile(kube, body)
                status = body["status"]
                history.append((status.get("step", 0), cond.get(status["conditions"], "Degraded")))
                degraded = history[-1][1]
                if degraded is not None and degraded["status"] == "False":
                    break
                time.sleep(0.05)
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
    finally:
        trainer.terminate()
        trainer.wait(timeout=30)

    seen = [(step, dict(c)) for step, c in history if c is not None]
    assert seen, f"no Degraded condition in {len(history)} reconciles (last step {history[-1][0]})"
    first_step, first = seen[0]
    assert first["status"] == "True" and first["reason"] == "LossSpike", first
    assert first["message"].startswith("LOSS_SPIKE at step 12 (SKIPPED): loss ")
    assert first_step >= 12
    last_step, last = seen[-1]
    assert last["status"] == "False" and last["reason"] == "Recovered", last
    assert "last anomaly LOSS_SPIKE at step 12" in last["message"] and last_step >= 12 + 20
    status = body["status"]
    assert status["lastAnomaly"] == {
        "kind": "LOSS_SPIKE", "step": 12, "action": "SKIPPED", "message": status["lastAnomaly"]["message"],
    }  # fmt: skip
    assert status["conditions"][-1]["type"] == "Running"  # the state column still says Running
    assert [c["type"] for c in status["conditions"]].count("Degraded") == 1


def test_a_flag_condition_keeps_the_state_last_and_is_not_created_false() -> None:
    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    running = cond.set_state([], "Running", "JobRunning", "2/2 workers running", now, 1)
    assert cond.set_flag(running, "Degraded", False, "Recovered", "fine", now, 1) == running
    degraded = cond.set_flag(running, "Degraded", True, "NonFinite", "NONFINITE at step 7", now, 1)
    assert [c["type"] for c in degraded] == ["Degraded", "Running"]
    assert cond.set_flag(degraded, "Degraded", True, "NonFinite", "NONFINITE at step 7", now, 1) == degraded
    later = now + datetime.timedelta(minutes=1)
    cleared = cond.set_flag(degraded, "Degraded", False, "Recovered", "healthy", later, 1)
    assert cleared[0]["status"] == "False" and cleared[0]["lastTransitionTime"] == "2026-12-01T00:01:00Z"
    assert cleared[-1]["type"] == "Running"


def test_a_nan_loss_is_not_written_into_the_job_status(monkeypatch) -> None:
    """A run diverged under `--anomaly-policy warn` reports loss NaN; JSON (and the API server) has none."""
    from dsv3.trainer.anomaly import Anomaly, Kind
    from dsv3.trainer.status import Board, StatusServer

    port = free_port()
    board = Board("nan-run", 10, step=4, loss=float("nan"), degraded=True)
    board.last_anomaly = Anomaly(
        Kind.NONFINITE, (Kind.NONFINITE,), 4, "loss nan, gradient norm nan", "WARNED"
    )
    server = StatusServer(board, "127.0.0.1", port).start()
    try:
        got = read_trainer_status(f"127.0.0.1:{port}")
        assert got.step == 4 and got.loss is None and got.degraded
        assert got.last_anomaly.reason == "Nonfinite" and got.last_anomaly.action == "WARNED"
    finally:
        server.stop()
