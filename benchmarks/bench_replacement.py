"""Latency while the expert placement changes: a rebalance, a scale 3 -> 4 shards, a SIGKILL of a shard.

Real processes on loopback: redis-server (the shard registry), 3 expert shards, the router, then a
4th shard. The model is the debug flavour widened (`--hidden`, `--width`, so a slot is megabytes and a
weight load takes real time) with one expert per MoE layer biased so that nearly every token picks it
(skewed routing). `--streams` clients run greedy Generate streams back to back the whole time; each
records its request latency and the gaps between its tokens. Phases, in one run:
- steady: traffic before any change (the baseline, measured side by side in the same run);
- rebalance: the `Rebalance` RPC, from the call until it returns, plus `--settle` seconds;
- scale 3 -> 4: from a 4th shard serving and announced in the registry (its process boots first: on
  this 2-core machine its imports would otherwise compete with the others) until the router routes
  to it, plus `--settle`;
- SIGKILL: a shard killed, until every expert has 2 copies on the survivors again, plus `--settle`.
For each: p50/p99 request latency, the ratio of p99 to the steady p99, and the longest gap between
two tokens of one stream (a stall). Every output is checked against the in-process model, and
failed requests are counted.

    python benchmarks/bench_replacement.py [--hidden 256] [--width 1024] [--streams 4] [--settle 3]
        [--out benchmarks/out/bench_replacement.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import _spawn, _wait_serving

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient
from dsv3.serving.ports import free_port

HOT = 13


@dataclasses.dataclass
class Record:
    start: float
    end: float
    max_gap: float
    ok: bool


def _model(directory: Path, hidden: int, width: int) -> DeepSeekV3:
    config = dataclasses.replace(
        ModelConfig.flavour("debug"), hidden_size=hidden, moe_intermediate_size=width
    )
    torch.manual_seed(0)
    model = DeepSeekV3(config).eval()
    with torch.no_grad():
        for gate in model.gates():
            gate.e_score_correction_bias[HOT] = 1.0
    model.save_pretrained(directory)
    return model


def _copies(placement) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for shard in placement.shards:
        if shard.live:
            for s in shard.slots:
                out[(s.layer, s.expert)] = out.get((s.layer, s.expert), 0) + 1
    return out


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--steady", type=float, default=8.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--out", default="benchmarks/out/bench_replacement.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_replacement_"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        model = _model(work / "hf", args.hidden, args.width)
        redis_port = free_port()
        procs["redis"] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(work),
            ],
            stdout=subprocess.DEVNULL,
        )
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        capacity = "32"

        def shard(name: str) -> str:
            port = free_port()
            procs[name] = _spawn(
                [
                    "-m",
                    "dsv3.expert_shard",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--capacity",
                    capacity,
                    "--device",
                    "cpu",
                    "--shard-id",
                    name,
                    "--redis-url",
                    redis_url,
                    "--registry-ttl-seconds",
                    "2",
                    "--advertise-address",
                    f"127.0.0.1:{port}",
                ],
                work / f"{name}.log",
            )
            return f"127.0.0.1:{port}"

        addresses = [shard(f"s{i}") for i in range(3)]
        for address in addresses:
            _wait_serving(address)
        router_port = free_port()
        procs["router"] = _spawn(
            [
                "-m",
                "dsv3.router",
                "--host",
                "127.0.0.1",
                "--port",
                str(router_port),
                "--model-dir",
                str(work / "hf"),
                "--device",
                "cpu",
                "--max-length",
                "64",
                "--redis-url",
                redis_url,
                "--discovery-interval-seconds",
                "0.3",
                "--health-interval-seconds",
                "0.2",
                "--redundant-experts",
                "4",
                "--load-window-seconds",
                "30",
            ],
            work / "router.log",
        )
        router = f"127.0.0.1:{router_port}"
        _wait_serving(router)
        result = _run(router, model, args, shard, procs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def _run(router: str, model: DeepSeekV3, args, shard, procs) -> dict:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (4, 9, 6, 12, 7)]
    expected = [generate(model, torch.tensor([p]), args.new_tokens)[0, len(p) :].tolist() for p in prompts]
    records: list[Record] = []
    mismatches = []
    stop = threading.Event()

    def stream(worker: int) -> None:
        with RouterClient(router, timeout_seconds=60) as client:
            i = worker
            while not stop.is_set():
                start = last = time.monotonic()
                gap, tokens, ok = 0.0, [], True
                try:
                    for token in client.stream(prompts[i % len(prompts)], args.new_tokens):
                        now = time.monotonic()
                        gap, last = max(gap, now - last), now
                        tokens.append(token)
                except grpc.RpcError:
                    ok = False
                if ok and tokens != expected[i % len(prompts)]:
                    mismatches.append(i)
                records.append(Record(start, time.monotonic(), gap, ok))
                i += 1

    with RouterClient(router, timeout_seconds=120) as client:
        _wait(lambda: sum(s.live for s in client.placement().shards) == 3, 60, "3 shards serving")
        for prompt in prompts:  # warm-up: first calls pay for channels and caches
            client.generate(prompt, args.new_tokens)
        workers = [threading.Thread(target=stream, args=(w,)) for w in range(args.streams)]
        for w in workers:
            w.start()
        phases: dict[str, tuple[float, float]] = {}
        details: dict[str, dict] = {}
        begin = time.monotonic()
        time.sleep(args.steady)
        phases["steady"] = (begin, time.monotonic())

        begin = time.monotonic()
        change = client.rebalance().change
        phases["rebalance"] = (begin, time.monotonic() + args.settle)
        details["rebalance"] = {
            "slots_moved": change.slots_moved,
            "balancedness_before": change.balancedness_before,
            "balancedness_after": change.balancedness_after,
            "apply_seconds": change.seconds,
        }
        time.sleep(args.settle)

        # the new shard boots first (on its own machine in a cluster; here its imports would compete
        # for the same 2 cores): the phase starts once it serves and announces itself
        _wait_serving(shard("s3"))
        begin = time.monotonic()
        _wait(lambda: sum(s.live for s in client.placement().shards) == 4, 60, "4th shard serving")
        details["scale 3 -> 4"] = {
            "slots_moved": client.placement().last_change.slots_moved,
            "until_serving_seconds": time.monotonic() - begin,
        }
        phases["scale 3 -> 4"] = (begin, time.monotonic() + args.settle)
        time.sleep(args.settle)

        begin = time.monotonic()
        procs["s1"].kill()

        def recovered() -> bool:
            placement = client.placement()
            copies = _copies(placement)
            live = sum(s.live for s in placement.shards)
            return live == 3 and len(copies) == 32 and min(copies.values()) >= 2

        _wait(recovered, 60, "copies re-created")
        details["SIGKILL"] = {
            "slots_moved": client.placement().last_change.slots_moved,
            "until_recovered_seconds": time.monotonic() - begin,
        }
        phases["SIGKILL"] = (begin, time.monotonic() + args.settle)
        time.sleep(args.settle)
        stop.set()
        for w in workers:
            w.join(120)

    steady = [r for r in records if r.end <= phases["steady"][1]]
    steady_p99 = _quantile([r.end - r.start for r in steady], 0.99)
    rows = {}
    print(
        f"\n{'phase':<14} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/steady':>10} "
        f"{'longest gap ms':>14} {'failed':>6}"
    )
    for name, (begin, end) in phases.items():
        inside = steady if name == "steady" else [r for r in records if r.end >= begin and r.start <= end]
        lat = [r.end - r.start for r in inside]
        row = {
            "requests": len(inside),
            "p50": _quantile(lat, 0.5),
            "p99": _quantile(lat, 0.99),
            "p99_vs_steady": _quantile(lat, 0.99) / steady_p99,
            "longest_gap": max((r.max_gap for r in inside), default=float("nan")),
            "failed": sum(not r.ok for r in inside),
            **details.get(name, {}),
        }
        rows[name] = row
        print(
            f"{name:<14} {row['requests']:>8d} {row['p50'] * 1e3:>8.0f} {row['p99'] * 1e3:>8.0f} "
            f"{row['p99_vs_steady']:>9.2f}x {row['longest_gap'] * 1e3:>14.0f} {row['failed']:>6d}"
        )
    for name, info in details.items():
        print(
            f"{name}: "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        )
    failed = sum(not r.ok for r in records)
    print(
        f"total {len(records)} requests, {failed} failed, {len(mismatches)} outputs differing from "
        f"in-process; longest request {max(r.end - r.start for r in records) * 1e3:.0f} ms"
    )
    return {
        "phases": rows,
        "requests": len(records),
        "failed": failed,
        "mismatches": len(mismatches),
        "config": vars(args),
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
