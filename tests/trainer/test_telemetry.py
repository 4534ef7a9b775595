"""The trainer's telemetry on a live 2-process run: a `train.step` span per step and rank, checkpoint
saves as spans whose children are the checkpoint client's gRPC calls, and rank 0's Prometheus metrics."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

from dsv3.serving.ports import free_port

STEPS = 12


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""


def _value(text: str, name: str) -> float | None:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{")]
    return max(values) if values else None


def test_steps_and_checkpoints_are_traced_and_metrics_scraped(
    tmp_path: Path, checkpoint_server, launch
) -> None:
    traces, port = tmp_path / "spans.jsonl", free_port()
    env = {**launch.env(), "DSV3_TRACE_FILE": str(traces)}
    args = ["--steps", str(STEPS), "--ep", "2", "--checkpoint", checkpoint_server.address, "--job", "traced",
            "--checkpoint-interval", "6", "--output-dir", str(tmp_path / "out"),
            "--metrics-port", str(port)]  # fmt: skip
    trainer = subprocess.Popen(launch.command(2, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env)  # fmt: skip
    last = ""
    while trainer.poll() is None:  # scrape while it runs: the endpoint goes with the process
        text = _scrape(port)
        last = text if "dsv3_trainer_step{" in text else last
        time.sleep(0.05)
    assert trainer.returncode == 0, trainer.stderr.read()[-4000:]
    assert (_value(last, "dsv3_trainer_step") or 0) >= 1, last[-2000:]
    assert (_value(last, "dsv3_trainer_tokens_total") or 0) > 0
    assert 'gate="0"' in last and "dsv3_trainer_step_duration_seconds_bucket" in last

    spans = [json.loads(line) for line in traces.read_text().splitlines()]
    steps = [s for s in spans if s["name"] == "train.step"]
    assert sorted((s["attributes"]["dsv3.rank"], s["attributes"]["dsv3.step"]) for s in steps) == [
        (rank, step) for rank in (0, 1) for step in range(1, STEPS + 1)
    ]
    assert all(s["service"] == "dsv3-trainer" and s["parent_id"] is None for s in steps)
    saves = [s for s in spans if s["name"] == "train.checkpoint"]
    assert sorted(s["attributes"]["dsv3.step"] for s in saves) == [6, 6, 12, 12]  # each rank saves its part
    by_id = {s["span_id"]: s for s in spans}
    for save in saves:
        parent = by_id[save["parent_id"]]
        assert (
            parent["name"] == "train.step"
            and parent["attributes"]["dsv3.step"] == save["attributes"]["dsv3.step"]
        )
        calls = [s for s in spans if s["parent_id"] == save["span_id"] and s["kind"] == "CLIENT"]
        assert any(c["name"].endswith("/Save") for c in calls), [c["name"] for c in calls]
