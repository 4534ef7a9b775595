"""`dsv3 up` end to end, as a user runs it: real checkpoint service, torchrun trainer, shards, router.

A short run completes and writes its summary, report and checkpoints; a second run reuses them; a child
killed mid-run stops the whole run with a message naming it; killing `dsv3 up` itself leaves nothing.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dsv3.up.children import RUN_ENV

pytestmark = pytest.mark.timeout(300)
STEPS = 8


def _port_base(span: int = 16) -> int:
    """A base with `span` consecutive free ports above it."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            for port in range(base, base + span):
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def _up(out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dsv3.cli", "up", "--steps", str(STEPS), "--output-dir", str(out),
            "--port-base", str(_port_base()), *extra]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_processes(run_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(RUN_ENV) == run_id:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _wait_gone(run_id: str, timeout: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _run_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _wait_serving(up: subprocess.Popen, out: Path, timeout: float = 240.0) -> str:
    """Read stdout until the --serve phase; the run's id."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        assert line or up.poll() is None, f"dsv3 up ended ({up.poll()}): {''.join(seen)}{up.stderr.read()}"
        seen.append(line)
        if "serving until Ctrl-C" in line:
            return json.loads((out / "run.json").read_text())["run_id"]
    raise AssertionError(f"never reached the serving phase: {''.join(seen)}")


def test_up_trains_serves_summarises_and_a_second_run_reuses_it(tmp_path: Path) -> None:
    out = tmp_path / "up"
    first = _up(out)
    stdout, stderr = first.communicate(timeout=280)
    assert first.returncode == 0, stdout + stderr
    assert "dsv3 up: done" in stdout
    training = re.search(r"training\s+loss ([\d.]+) -> ([\d.]+) over (\d+) steps", stdout)
    assert training and int(training[3]) == STEPS and float(training[2]) < float(training[1]), stdout
    served = re.search(r"serving\s+(\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)", stdout)
    assert served and int(served[1]) == 64 and float(served[2]) > 0, stdout
    drafts = re.search(r"drafts\s+MTP speculative decoding: (\d+) of (\d+) drafts accepted", stdout)
    assert drafts and 0 <= int(drafts[1]) <= int(drafts[2]) and int(drafts[2]) > 0, stdout
    assert re.search(r"balance\s+(rebalanced to placement v\d+|placement v\d+ kept)", stdout), stdout
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train" / "hf" / "config.json").exists()
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert _run_processes(json.loads((out / "run.json").read_text())["run_id"]) == []

    second = _up(out)
    stdout, stderr = second.communicate(timeout=280)
    assert second.returncode == 0, stdout + stderr
    trainer_log = (out / "logs" / "trainer.log").read_text()
    assert f"resumed job=up from step {STEPS}" in trainer_log  # the committed final step, not a new run


def test_a_killed_child_stops_the_run_with_its_name_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "up"
    up = _up(out, "--serve")
    run_id = _wait_serving(up, out)
    (victim,) = [p for p in _run_processes(run_id) if "expert-shard-1" in " ".join(p.cmdline())]
    victim.send_signal(signal.SIGKILL)
    _, stderr = up.communicate(timeout=60)
    assert up.returncode == 1, stderr
    assert f"the expert-shard-1 process (pid {victim.pid}) exited with signal SIGKILL" in stderr
    assert _wait_gone(run_id) == []


def test_killing_dsv3_up_itself_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "up"
    up = _up(out, "--serve")
    run_id = _wait_serving(up, out)
    assert len(_run_processes(run_id)) >= 4  # checkpoint, 2 shards, router
    os.kill(up.pid, signal.SIGKILL)  # no chance to clean up: the children must go by themselves
    up.wait(timeout=10)
    assert _wait_gone(run_id) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shards", "0"], "--shards must be >= 1, got 0"),
        (["--steps", "-3"], "--steps must be >= 1, got -3"),
        (["--port-base", "80"], "--port-base must be in [1024, 65522], got 80"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path: Path, flags: list, message: str, capsys) -> None:
    from dsv3.cli import main

    assert main(["up", "--output-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run.json").exists()  # refused before anything started


def test_a_port_in_use_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    from dsv3.cli import main

    base = _port_base()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 2))
        busy.listen()
        assert main(["up", "--output-dir", str(tmp_path), "--port-base", str(base)]) == 2
    assert f"port {base + 2} (for router) is in use" in capsys.readouterr().err
