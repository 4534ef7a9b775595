"""MTP speculative decoding: acceptance rate, MTP step cost, decode tokens/s with and without speculation.

One run, on a small MTP model trained on the default corpus (`dsv3 demo`'s loop; `--model-dir` reuses
one): greedy decoding of B held-out stdlib snippets (32 bytes each) for N new tokens (EOS ignored),
at batch 1 and 16, in-process (the router's continuous-batching engine over the whole model) and
through router + 2 expert shards (real processes on loopback, B concurrent Generate streams; one
router with speculation, one with `--speculative off`, each over its own 2 shards). Contenders
alternate within each repeat; the best repeat of each is kept.

- decode tokens/s = B * (N - 1) / (time from every sequence's first token to the last token);
- a = accepted / verified drafts (the engine's counters; Generate's final messages through the router);
- r = model time of the MTP draft per decode step / model time of a plain decode step, measured in the
  same run (the engines' `decode_seconds` / `mtp_seconds` counters; the routers' /metrics);
- ideal speed-up of one draft token (1 + a) / (1 + r), and the measured speed-up as % of it.

    python benchmarks/bench_speculative.py [--model-dir DIR | --train-steps 1000] [--repeats 3]
        [--new-tokens 64] [--out benchmarks/out/bench_speculative.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import _spawn, _wait_serving

from dsv3.corpus import stdlib_bytes
from dsv3.demo import DemoSettings, run_demo
from dsv3.model import DeepSeekV3
from dsv3.router.engine import Engine, SamplingParams
from dsv3.rpc.v1 import router_pb2, router_pb2_grpc
from dsv3.serving.ports import free_port

BATCHES = (1, 16)
PROMPT = 32


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    data = stdlib_bytes()
    rng = random.Random(seed)
    tail = len(data) - len(data) // 10  # the held-out tenth of the corpus
    return [
        list(data[s : s + PROMPT]) for s in (rng.randrange(tail, len(data) - PROMPT) for _ in range(count))
    ]


# ---- in-process ------------------------------------------------------------------------------------
def _in_process(model: DeepSeekV3, speculative: bool, prompts: list[list[int]], new: int, max_length: int):
    """(decode seconds, tokens, drafted, accepted, mtp seconds / step, decode seconds / step)."""

    async def main():
        engine = Engine(model, len(prompts), max_length, ThreadPoolExecutor(1), speculative=speculative)
        runner = asyncio.create_task(engine.run())
        firsts: list[float] = []

        async def one(job) -> list[int]:
            out = []
            async for token in engine.tokens(job):
                out.append(token)
                if len(out) == 1:
                    firsts.append(time.perf_counter())
            return out

        jobs = [engine.submit(p, SamplingParams(new, ignore_eos=True)) for p in prompts]
        outputs = await asyncio.gather(*(one(j) for j in jobs))
        end = time.perf_counter()
        runner.cancel()
        mtp = engine.speculator.mtp_seconds if engine.speculator else 0.0
        steps = max(engine.steps, 1)
        return (
            end - max(firsts),
            outputs,
            engine.drafted,
            engine.accepted,
            mtp / steps,
            engine.decode_seconds / steps,
        )

    return asyncio.run(main())


# ---- router + shards -------------------------------------------------------------------------------
def _scrape(http: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    out = {}
    for name in ("dsv3_decode_steps_total", "dsv3_decode_seconds_total", "dsv3_spec_mtp_seconds_total"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(match.group(1)) if match else 0.0
    return out


def _router_run(address: str, http: str, prompts: list[list[int]], new: int):
    before = _scrape(http)

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            firsts: list[float] = []

            async def one(prompt: list[int]):
                tokens, final = [], None
                request = router_pb2.GenerateRequest(prompt_ids=prompt, max_tokens=new, ignore_eos=True)
                async for reply in stub.Generate(request, timeout=900):
                    tokens.append(reply.token)
                    if len(tokens) == 1:
                        firsts.append(time.perf_counter())
                    final = reply
                return tokens, final

            results = await asyncio.gather(*(one(p) for p in prompts))
            return time.perf_counter() - max(firsts), results

    seconds, results = asyncio.run(main())
    after = _scrape(http)
    steps = max(after["dsv3_decode_steps_total"] - before["dsv3_decode_steps_total"], 1)
    mtp = (after["dsv3_spec_mtp_seconds_total"] - before["dsv3_spec_mtp_seconds_total"]) / steps
    decode = (after["dsv3_decode_seconds_total"] - before["dsv3_decode_seconds_total"]) / steps
    outputs = [t for t, _ in results]
    drafted = sum(f.draft_tokens for _, f in results)
    accepted = sum(f.accepted_draft_tokens for _, f in results)
    return seconds, outputs, drafted, accepted, mtp, decode


def _start_cluster(model_dir: Path, work: Path, speculative: bool, max_length: int, threads: int):
    procs, shards = [], []
    for _ in range(2):
        port = free_port()
        args = ["-m", "dsv3.expert_shard", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        procs.append(_spawn([*args, "--capacity", "256"], work / f"shard{port}.log"))
        shards.append(f"127.0.0.1:{port}")
    port, http_port = free_port(), free_port()
    args = ["-m", "dsv3.router", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port)]
    args += ["--device", "cpu", "--model-dir", str(model_dir), "--shards", ",".join(shards)]
    args += [
        "--max-batch",
        "16",
        "--max-length",
        str(max_length),
        "--speculative",
        "on" if speculative else "off",
    ]
    procs.append(_spawn(args, work / f"router-{'spec' if speculative else 'plain'}.log", threads))
    return procs, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="an MTP model (HF layout); else train one"
    )
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (2 oversubscribe 2 cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_speculative.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = work / "model"
        print(
            f"training the debug flavour for {args.train_steps} steps (16 x 128 stdlib bytes) ...", flush=True
        )
        run_demo(DemoSettings(steps=args.train_steps, batch=16, seq_len=128, output_dir=model_dir), log=print)
    model = DeepSeekV3.from_pretrained(model_dir).eval()
    if not len(model.mtp):
        raise SystemExit(f"{model_dir} has no MTP layers")
    max_length = PROMPT + args.new_tokens + 8
    prompts = _prompts(max(BATCHES))
    procs: list[subprocess.Popen] = []
    clusters = {}
    try:
        for speculative in (False, True):
            started, address, http = _start_cluster(model_dir, work, speculative, max_length, args.threads)
            procs += started
            clusters[speculative] = (address, http)
        for address, _ in clusters.values():
            _wait_serving(address, timeout=180)
        for speculative in (False, True):  # warm-up: first-call costs stay out of the timings
            _in_process(model, speculative, prompts[:2], 8, max_length)
            _router_run(*clusters[speculative], prompts[:2], 8)
        best: dict[tuple[str, int, bool], tuple] = {}
        mismatches = 0
        for batch in BATCHES:
            for _ in range(args.repeats):
                outputs = {}
                for path in ("in-process", "router"):
                    for speculative in (False, True):
                        if path == "in-process":
                            result = _in_process(
                                model, speculative, prompts[:batch], args.new_tokens, max_length
                            )
                        else:
                            address, http = clusters[speculative]
                            result = _router_run(address, http, prompts[:batch], args.new_tokens)
                        key = (path, batch, speculative)
                        outputs[key] = result[1]
                        if key not in best or result[0] < best[key][0]:
                            best[key] = result
                    mismatches += outputs[(path, batch, False)] != outputs[(path, batch, True)]
        rows = []
        for path in ("in-process", "router"):
            for batch in BATCHES:
                plain, spec = best[(path, batch, False)], best[(path, batch, True)]
                decoded = batch * (args.new_tokens - 1)
                plain_tps, spec_tps = decoded / plain[0], decoded / spec[0]
                a = spec[3] / max(spec[2], 1)
                r = spec[4] / plain[5]
                ideal = (1 + a) / (1 + r)
                speedup = spec_tps / plain_tps
                rows.append(
                    dict(
                        path=path,
                        batch=batch,
                        plain_tokens_per_s=plain_tps,
                        speculative_tokens_per_s=spec_tps,
                        speedup=speedup,
                        acceptance=a,
                        mtp_cost_ratio=r,
                        ideal_speedup=ideal,
                        percent_of_ideal=100 * speedup / ideal,
                        plain_step_ms=1000 * plain[5],
                        speculative_step_ms=1000 * spec[5],
                        mtp_ms=1000 * spec[4],
                    )
                )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    header = "| path | batch | plain tok/s | spec tok/s | speed-up | a | r | ideal (1+a)/(1+r) | % of ideal |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['path']} | {row['batch']} | {row['plain_tokens_per_s']:.0f} | "
            f"{row['speculative_tokens_per_s']:.0f} | {row['speedup']:.2f}x | {row['acceptance']:.3f} | "
            f"{row['mtp_cost_ratio']:.3f} | {row['ideal_speedup']:.2f}x | {row['percent_of_ideal']:.0f}% |"
        )
    print(f"greedy outputs with and without speculation differed in {mismatches} of the compared runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            dict(
                date=datetime.date.today().isoformat(),
                machine=f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
                model_dir=str(model_dir),
                new_tokens=args.new_tokens,
                prompt_tokens=PROMPT,
                repeats=args.repeats,
                threads=args.threads,
                greedy_mismatches=mismatches,
                rows=rows,
            ),
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
