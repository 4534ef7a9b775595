"""One trace per request through router + 2 shards: the entry span (gRPC `Generate`, or the HTTP API
request), the batch steps it took part in, each MoE layer's dispatch, the shard calls and the shards'
own spans, read back from every process's span file (DSV3_TRACE_FILE, sampling everything)."""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from pathlib import Path

import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient
from dsv3.serving.ports import free_port

MOE_LAYERS = {1, 2}  # the debug flavour: layer 0 dense, 1 and 2 MoE (speculation off: no MTP layer)


def _samples(text: str, name: str) -> dict[str, float]:
    """{'layer="1"': value, ...}: a metric's samples by their dsv3 label (other labels dropped)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = line[len(name) + 1 : line.index("}")].split(",")
            key = ",".join(x for x in labels if x.startswith(("layer=", "direction=")))
            out[key] = out.get(key, 0.0) + float(line.split()[-1])
    return out


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_tree(spans: list[dict], root: dict) -> None:
    by_id = {s["span_id"]: s for s in spans}
    children = defaultdict(list)
    for s in spans:
        children[s["parent_id"]].append(s)

    def ancestors(span: dict) -> list[str]:
        chain = []
        while span["parent_id"] in by_id:
            span = by_id[span["parent_id"]]
            chain.append(span["span_id"])
        return chain

    # The steps hang under the request's entry span (directly for gRPC; HTTP: under FastAPI's endpoint span).
    steps = [s for s in spans if s["name"].startswith("router.") and root["span_id"] in ancestors(s)]
    assert steps, f"no batch step under {root['name']}"
    assert all(s["service"] == "dsv3-router" for s in steps)
    for step in steps:
        layers = [s for s in children[step["span_id"]] if s["name"] == "moe.layer"]
        assert {s["attributes"]["dsv3.layer"] for s in layers} == MOE_LAYERS, step
        for layer in layers:
            calls = [s for s in children[layer["span_id"]] if s["kind"] == "CLIENT"]
            assert calls and all(c["name"].endswith("ExpertShardService/Compute") for c in calls)
            assert len(calls) <= 2  # one call per involved shard, never one per expert or token
            for call in calls:
                (served,) = [s for s in children[call["span_id"]] if s["kind"] == "SERVER"]
                assert served["service"] == "dsv3-expert-shard" and served["name"] == call["name"]


def test_one_trace_per_request_from_entry_to_the_shards(tmp_path: Path, spawn, monkeypatch) -> None:
    traces = tmp_path / "spans.jsonl"
    monkeypatch.setenv("DSV3_TRACE_FILE", str(traces))
    torch.manual_seed(0)
    DeepSeekV3(ModelConfig.flavour("debug")).eval().save_pretrained(tmp_path / "model")
    shard_metrics = [free_port(), free_port()]
    shards = [spawn("dsv3.expert_shard", "--device", "cpu", "--shard-id", f"s{i}",
                    "--metrics-port", str(port)) for i, port in enumerate(shard_metrics)]  # fmt: skip
    http = free_port()
    router = spawn("dsv3.router", "--model-dir", str(tmp_path / "model"), "--device", "cpu", "--max-length",
                   "64", "--shards", ",".join(s.address for s in shards), "--http-port", str(http),
                   "--served-model-name", "tiny")  # fmt: skip
    with RouterClient(router.address) as client:
        assert len(client.generate([5, 6, 7], max_tokens=3)) == 3
    body = json.dumps({"model": "tiny", "prompt": [9, 10], "max_tokens": 3}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    assert json.load(urllib.request.urlopen(request, timeout=60))["usage"]["completion_tokens"] == 3
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=30).read().decode()
    scraped = [urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=30).read().decode()
               for p in shard_metrics]  # fmt: skip
    router.stop()
    for shard in shards:
        shard.stop()

    spans = _spans(traces)
    generate = [s for s in spans if s["name"].endswith("RouterService/Generate") and s["kind"] == "SERVER"]
    posted = [s for s in spans if s["name"] == "POST /v1/completions"]
    assert len(generate) == 1 and len(posted) == 1, posted  # one trace per request ...
    assert generate[0]["trace_id"] != posted[0]["trace_id"]
    for root in (generate[0], posted[0]):
        assert root["parent_id"] is None and root["service"] == "dsv3-router"
        _check_tree([s for s in spans if s["trace_id"] == root["trace_id"]], root)  # ... with its tree
    # The metrics agree with what was served: 3 tokens for the HTTP request, 2 decode steps each.
    generated = [line for line in metrics.splitlines() if line.startswith("dsv3_generation_tokens_total ")]
    assert float(generated[0].split()[1]) == 3.0
    steps = [line for line in metrics.splitlines() if line.startswith("dsv3_decode_steps_total ")]
    assert float(steps[0].split()[1]) == 4.0  # 2 per request after its prefill (3 tokens each)
    up = [line for line in metrics.splitlines() if line.startswith("dsv3_shard_up{")]
    assert len(up) == 2 and all(line.endswith(" 1.0") for line in up), up
    dispatches = _samples(metrics, "dsv3_router_dispatch_duration_seconds_count")
    assert set(dispatches) == {f'layer="{n}"' for n in MOE_LAYERS}
    assert all(v == 6.0 for v in dispatches.values())  # 3 forwards per request, 2 requests, each layer
    rows = [sum(_samples(text, "dsv3_shard_rows_total").values()) for text in scraped]
    assert all(r > 0 for r in rows), rows  # both shards computed, and say so on their own endpoints
    assert all("dsv3_shard_compute_duration_seconds_bucket" in text for text in scraped)
