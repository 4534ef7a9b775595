"""Fault tolerance and status against live runs: a worker SIGKILLed after a checkpoint, torchrun restarts
the group (`--max-restarts`), training resumes from the last committed checkpoint and ends with exactly
the weights of the uninterrupted run; rank 0 answers `TrainerService.Status` while it trains."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import trainer_pb2, trainer_pb2_grpc
from dsv3.serving.ports import free_port

STEPS = 60


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "dsv3.trainer" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _wait(condition, timeout: float, what: str, launcher: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert launcher.poll() is None, f"trainer exited ({launcher.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


STATUS_TIMEOUT = 1.0


# What a status poll may get besides a status: not serving (yet, or any more), too slow, or cancelled by a
# server that is shutting down (see `_poll_status`).
_CODE = grpc.StatusCode
EXPECTED_FAILURES = (_CODE.UNAVAILABLE, _CODE.DEADLINE_EXCEEDED, _CODE.CANCELLED)


# Reconnect quickly: the default backoff grows to seconds while the trainer starts and can miss a short run.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def _poll_status(launcher: subprocess.Popen, port: int) -> list[trainer_pb2.TrainerStatusResponse]:
    """Status responses until the run ends (connection refused before the server is up, and after).

    A CANCELLED answer is expected once, at the end: grpc-core cancels the calls that reach a server whose
    shutdown has begun (measured: CANCELLED within 2 ms, the server's end of the connection in TIME_WAIT,
    the run's last status seconds before). So after a CANCELLED no status may be answered any more; a
    CANCELLED mid-run would be followed by answers and fails the test. (Only a call that outlived its
    deadline may also end CANCELLED, when the server's RST_STREAM beats the client's timer: grpc/grpc#53.)
    """
    seen: list[trainer_pb2.TrainerStatusResponse] = []
    cancelled_after: int | None = None  # how many statuses had been answered when a call was cancelled
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        while launcher.poll() is None:
            started = time.monotonic()
            try:
                seen.append(stub.Status(trainer_pb2.TrainerStatusRequest(), timeout=STATUS_TIMEOUT))
                if len(seen) == 1:
                    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=STATUS_TIMEOUT)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError as exc:
                assert exc.code() in EXPECTED_FAILURES, exc
                late = time.monotonic() - started >= STATUS_TIMEOUT * 0.95
                if exc.code() == grpc.StatusCode.CANCELLED and not late and cancelled_after is None:
                    cancelled_after = len(seen)
            time.sleep(0.01)
    assert cancelled_after is None or cancelled_after == len(seen), "CANCELLED mid-run, then answers again"
    return seen


def test_sigkilled_worker_restarts_and_ends_with_the_uninterrupted_weights(
    tmp_path: Path, checkpoint_server, launch
) -> None:
    address = checkpoint_server.address
    common = ["--steps", str(STEPS), "--ep", "2", "--checkpoint", address, "--checkpoint-interval", "10"]

    # The uninterrupted run, watched through its status server.
    ref, port = tmp_path / "ref", free_port()
    reference = subprocess.Popen(
        launch.command(2, [*common, "--job", "fault-ref", "--output-dir", str(ref), "--export",
                           str(ref / "hf"), "--status-port", str(port)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=launch.env(),
    )  # fmt: skip
    seen = _poll_status(reference, port)
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-4000:]
    running = [s for s in seen if s.state == "RUNNING"]
    assert running, f"never saw the run RUNNING: {seen[:3]}"
    assert all(s.total == STEPS and s.job == "fault-ref" and s.world_size == 2 for s in seen)
    assert all(s.expert_parallel == 2 and s.data_parallel == 1 for s in seen)
    steps = [s.step for s in running]
    assert steps == sorted(steps) and 0 < steps[-1] <= STEPS
    assert any(s.step > 0 and s.loss > 0 and s.tokens_per_second > 0 for s in running)
    checkpointed = [s.last_checkpoint_step for s in seen if s.has_checkpoint]
    assert checkpointed and all(c % 10 == 0 for c in checkpointed)

    # The same run, one worker SIGKILLed right after the first committed checkpoint.
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        launch.command(2, [*common, "--job", "fault", "--output-dir", str(out), "--export", str(out / "hf")],
                       max_restarts=2),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=launch.env(),
    )  # fmt: skip
    with CheckpointClient(address, retries=1) as client:
        committed = _wait(lambda: client.latest("fault"), 180, "the first checkpoint", launcher)
        victim = _wait(lambda: _worker(launcher, 1), 10, "rank 1's process", launcher)
        victim.send_signal(signal.SIGKILL)
        killed_after = client.latest("fault")
        _, err = launcher.communicate(timeout=240)
        assert launcher.returncode == 0, err[-4000:]
        assert client.latest("fault") == STEPS
    assert committed < STEPS and killed_after < STEPS, "the worker must die before the run ends"
    resumed = re.findall(r"resumed job=fault from step (\d+)", err)  # torchrun restarted the group
    assert len(resumed) == 1 and committed <= int(resumed[0]) <= killed_after, (resumed, committed)
    logged = [r["step"] for r in launch.metrics(out)]
    assert set(logged) == set(range(1, STEPS + 1)) and logged[-1] == STEPS
    expected, got = _weights(ref / "hf"), _weights(out / "hf")
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert different == [], f"weights differ from the uninterrupted run: {different[:5]}"
    assert launch.losses(ref) == launch.losses(out)
