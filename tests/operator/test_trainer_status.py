"""The operator reads a real trainer's progress: `dsv3-trainer` under torchrun (one process) serves
`TrainerService.Status`, the operator's reader returns it, and the job status fields follow it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dsv3.operator import handlers
from dsv3.operator.trainer_status import read_trainer_status
from dsv3.serving.ports import free_port


def test_a_real_trainer_reports_its_step_to_the_operator(tmp_path: Path, monkeypatch) -> None:
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "dsv3.trainer", "--steps", "400", "--batch", "2", "--seq-len", "32",
               "--job", "team.status-run", "--status-port", str(port),
               "--output-dir", str(tmp_path)]  # fmt: skip
    trainer = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    try:
        deadline, seen = time.monotonic() + 120, None
        while time.monotonic() < deadline and trainer.poll() is None:
            seen = read_trainer_status(f"127.0.0.1:{port}", timeout=1.0)
            if seen is not None and seen.step >= 2:
                break
            time.sleep(0.05)
        assert trainer.poll() is None, trainer.stderr.read()[-3000:]
        assert seen is not None and seen.step >= 2, f"no progress seen: {seen}"
        assert seen.state == "RUNNING" and seen.total == 400
        assert seen.loss is not None and seen.loss > 0 and seen.tokens_per_second > 0
        assert seen.last_checkpoint_step is None  # no checkpoint service: nothing committed

        # The handler's status fields come from the same call (pod DNS replaced by the loopback port).
        monkeypatch.setattr(handlers, "worker_address", lambda owner, rank, p, cfg: f"127.0.0.1:{port}")
        status: dict = {}
        handlers._read_progress(None, 1, handlers.CONFIG, status)
        assert status["totalSteps"] == 400 and status["step"] >= seen.step
        assert status["loss"] > 0 and status["tokensPerSecond"] > 0 and "lastCheckpointStep" not in status
    finally:
        trainer.terminate()
        try:
            trainer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            trainer.kill()
