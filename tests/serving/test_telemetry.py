"""OpenTelemetry across processes: a client's trace continues in the checkpoint server (W3C context in
gRPC metadata), spans land in each process's exporter, metrics reach the Prometheus endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from dsv3.serving.ports import free_port

CLIENT = textwrap.dedent(
    """
    import sys, torch
    from dsv3.serving import telemetry
    assert telemetry.setup("test-client")
    from dsv3.checkpoint import CheckpointClient
    with telemetry.tracer("test").start_as_current_span("request"):
        with CheckpointClient(sys.argv[1], streams=1) as client:
            client.save("traced", 1, {"w": torch.ones(4)})
            client.commit("traced", 1)
            assert torch.equal(client.load("traced", 1)["w"], torch.ones(4))
    telemetry.shutdown()
    """
)


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_client_trace_continues_in_the_server_process(tmp_path: Path, spawn, monkeypatch) -> None:
    trace_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("DSV3_TRACE_FILE", str(trace_file))
    metrics_port = free_port()
    server = spawn(
        "dsv3.checkpoint", "--data-dir", str(tmp_path / "data"), "--metrics-port", str(metrics_port)
    )
    client = subprocess.run([sys.executable, "-c", CLIENT, server.address], capture_output=True, text=True)
    assert client.returncode == 0, client.stderr[-3000:]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    server.stop()
    moved = {line.split("direction=")[1][1:5]: float(line.split()[-1])
             for line in scraped.splitlines() if line.startswith("dsv3_checkpoint_bytes_total{")}  # fmt: skip
    # one float32 tensor of 4 each way: its part file (header included) written, its 16 bytes read back
    assert moved["load"] == 16.0 and moved["save"] >= 16.0, moved
    spans = _spans(trace_file)
    (root,) = [s for s in spans if s["name"] == "request"]
    assert root["service"] == "test-client" and root["parent_id"] is None
    in_trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    by_id = {s["span_id"]: s for s in in_trace}
    calls = [s for s in in_trace if s["kind"] == "CLIENT"]
    handled = [s for s in in_trace if s["kind"] == "SERVER"]
    assert {s["name"].rsplit("/", 1)[-1] for s in calls} >= {"Save", "Commit", "Load"}, [
        s["name"] for s in calls
    ]
    assert all(by_id[s["parent_id"]]["name"] == "request" for s in calls)
    # Every server span is in the client's trace, a child of the client span of the same call.
    assert len(handled) == len(calls) and all(s["service"] == "dsv3-checkpoint" for s in handled)
    for span in handled:
        parent = by_id[span["parent_id"]]
        assert parent["kind"] == "CLIENT" and parent["name"] == span["name"]
        assert parent["start_ns"] <= span["start_ns"] and span["end_ns"] <= parent["end_ns"] + 5_000_000


def test_no_tracing_configured_means_no_interceptors(monkeypatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "DSV3_TRACE_FILE"):
        monkeypatch.delenv(name, raising=False)
    from dsv3.serving import telemetry

    assert not telemetry.tracing_requested()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not telemetry.tracing_requested()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert telemetry.tracing_requested()


def test_metrics_are_scraped_from_the_prometheus_endpoint() -> None:
    code = textwrap.dedent(
        """
        import sys, urllib.request
        from dsv3.serving import telemetry
        telemetry.setup("test-metrics")
        port = telemetry.serve_metrics(int(sys.argv[1]), host="127.0.0.1")
        telemetry.meter("test").create_counter("dsv3_test_tokens", unit="1").add(7, {"layer": "3"})
        print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(free_port())], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("dsv3_test_tokens") and "layer" in x]
    assert 'layer="3"' in line and float(line.split()[-1]) == 7.0


@pytest.mark.parametrize("port", [0, -1])
def test_metrics_port_zero_or_less_serves_nothing(port: int) -> None:
    from dsv3.serving import telemetry

    assert telemetry.serve_metrics(port) == 0
