"""What tracing costs the serving path: router + 2 expert shards, tracing off against tracing on at 1%
sampling (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.01`, spans to a file
exporter), both stacks up at once and measured alternately: decode tokens/s of a batch of streams.

    python benchmarks/bench_tracing.py [--repeats 5] [--batch 16] [--new-tokens 32] [--sample 0.01]
Goal (issue 16): tracing at 1% costs < 3% tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import _router_batch, _spawn, _wait_serving

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.serving.ports import free_port

GOAL = 0.03


def _stack(model_dir: Path, work: Path, env: dict[str, str], where: str = "all") -> tuple[str, list]:
    """Router + 2 shards; `env` (the tracing settings) goes to the processes `where` names."""
    shard_env = env if where in ("all", "shards") else {}
    router_env = env if where in ("all", "router") else {}
    ports = [free_port() for _ in range(3)]
    shard = ["-m", "dsv3.expert_shard", "--host", "127.0.0.1", "--device", "cpu"]
    procs = [_spawn([*shard, "--port", str(p), "--shard-id", f"s{p}"], work / f"shard-{p}.log", env=shard_env)
             for p in ports[:2]]  # fmt: skip
    for p in ports[:2]:
        _wait_serving(f"127.0.0.1:{p}")
    router = ["-m", "dsv3.router", "--host", "127.0.0.1", "--port", str(ports[2]), "--device", "cpu",
              "--model-dir", str(model_dir), "--http-port", "0", "--speculative", "off",
              "--shards", ",".join(f"127.0.0.1:{p}" for p in ports[:2])]  # fmt: skip
    procs.append(_spawn(router, work / f"router-{ports[2]}.log", env=router_env))
    _wait_serving(f"127.0.0.1:{ports[2]}")
    return f"127.0.0.1:{ports[2]}", procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sample", type=float, default=0.01)
    parser.add_argument("--control", action="store_true", help="A/A check: the second stack untraced too")
    parser.add_argument("--where", choices=("all", "router", "shards"), default="all", help="traced ones")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_tracing.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        DeepSeekV3(ModelConfig.flavour("debug")).eval().save_pretrained(work / "model")
        traced_env = {
            "DSV3_TRACE_FILE": str(work / "spans.jsonl"),
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(args.sample),
        }
        stacks = {
            "tracing off": _stack(work / "model", work, {}),
            "tracing on": _stack(work / "model", work, {} if args.control else traced_env, args.where),
        }
        prompts = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(args.batch)]  # fmt: skip
        best = dict.fromkeys(stacks, 0.0)
        try:
            for address, _ in stacks.values():  # warm-up
                asyncio.run(_router_batch(address, prompts, 4))
            for repeat in range(args.repeats):
                order = list(stacks.items())
                for name, (address, _) in order if repeat % 2 == 0 else order[::-1]:  # no side always second
                    _, decode = asyncio.run(_router_batch(address, prompts, args.new_tokens))
                    best[name] = max(best[name], args.batch * (args.new_tokens - 1) / decode)
        finally:
            for _, procs in stacks.values():
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
        spans = sum(1 for _ in (work / "spans.jsonl").open()) if (work / "spans.jsonl").exists() else 0
    cost = 1 - best["tracing on"] / best["tracing off"]
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"router + 2 shards (debug flavour), batch {args.batch}, {args.new_tokens} new tokens, "
          f"best of {args.repeats}, alternating")  # fmt: skip
    for name, rate in best.items():
        print(f"{name:>12} | {rate:>8.1f} decode tokens/s")
    print(
        f"tracing at {args.sample:.0%} sampling costs {cost:+.1%} tokens/s ({spans} spans exported); "
        f"goal < {GOAL:.0%}: {'met' if cost < GOAL else 'NOT met'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": str(datetime.date.today()), "tokens_per_s": best, "cost": cost, "sample": args.sample,
              "spans": spans, "batch": args.batch}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
