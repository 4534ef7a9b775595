"""Expert-placement planner vs DeepSeek's EPLB, side by side on the same seeded skewed loads.

Loads are 58 MoE layers x 256 experts (DeepSeek-V3), lognormal (sigma 1.3) and Zipf (exponent 0.55,
experts ranked in a random order per layer); the seeds and the skews are fixed so that EPLB lands
near the figures recorded in ANCHORS.md. Configs: 288 slots on 32 GPUs in 4 nodes and 320 slots on 64
GPUs in 8 nodes (hierarchical: 8 groups), and 320 slots on 64 GPUs with 8 groups over 16 nodes
(global). For each: balancedness (max / mean GPU load per layer, averaged over layers; each expert's
load split evenly over its copies), the largest layer's value, same-GPU duplicate copies, and the
time per plan (best of `--repeats`, contenders alternated).

Then the migration-aware mode on a load that drifts step by step (each expert's load multiplied by
exp(N(0, drift)) per step): slots moved and balancedness per step for `migrate_experts` at a few
tolerances, against planning afresh every step (which moves most slots).

EPLB is not part of this repository: give the path of a checkout (its eplb.py), e.g.
`git clone https://github.com/deepseek-ai/EPLB /tmp/EPLB`.

    python benchmarks/bench_placement.py --eplb /tmp/EPLB [--repeats 5] [--steps 10]
        [--out benchmarks/out/bench_placement.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from dsv3.balance.placement import migrate_experts, rebalance_experts

LAYERS, EXPERTS, GROUPS = 58, 256, 8
CONFIGS = {  # name: (num_replicas, num_groups, num_nodes, num_gpus)
    "4 nodes, 32 GPUs, 288 slots": (288, GROUPS, 4, 32),
    "8 nodes, 64 GPUs, 320 slots": (320, GROUPS, 8, 64),
    "global, 64 GPUs, 320 slots": (320, GROUPS, 16, 64),
}


def skewed_load(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        return torch.exp(torch.randn(LAYERS, EXPERTS, generator=g, dtype=torch.float64) * 1.3) * 1000
    ranks = torch.stack([torch.randperm(EXPERTS, generator=g) for _ in range(LAYERS)]) + 1
    return 1e5 / ranks.double() ** 0.55


def gpu_balance(weight: torch.Tensor, phy2log: torch.Tensor, gpus: int) -> torch.Tensor:
    """max / mean GPU load per layer [L]."""
    count = torch.zeros_like(weight, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    per_gpu = (weight.double() / count).gather(1, phy2log).view(weight.shape[0], gpus, -1).sum(-1)
    return per_gpu.max(1).values / per_gpu.mean(1)


def same_gpu_duplicates(phy2log: torch.Tensor, gpus: int) -> int:
    per_gpu = phy2log.view(phy2log.shape[0], gpus, -1).sort(-1).values
    return int((per_gpu.diff(dim=-1) == 0).sum())


def load_eplb(path: str):
    file = Path(path) / "eplb.py" if Path(path).is_dir() else Path(path)
    spec = importlib.util.spec_from_file_location("eplb_reference", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, *args) -> tuple[float, object]:
    begin = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - begin, out


def compare(eplb, repeats: int) -> list[dict]:
    rows = []
    for kind in ("lognormal", "zipf"):
        weight = skewed_load(kind)
        for name, (replicas, groups, nodes, gpus) in CONFIGS.items():
            contenders = {
                "eplb": lambda w, *a: eplb.rebalance_experts(w.float(), *a),
                "dsv3": rebalance_experts,
            }
            best = dict.fromkeys(contenders, float("inf"))
            plans = {}
            for _ in range(repeats):
                for who, fn in contenders.items():  # alternate, keep the best time
                    seconds, plans[who] = timed(fn, weight, replicas, groups, nodes, gpus)
                    best[who] = min(best[who], seconds)
            row = {"load": kind, "config": name}
            for who in contenders:
                balance = gpu_balance(weight, plans[who][0], gpus)
                row[who] = {
                    "balancedness": float(balance.mean()),
                    "worst_layer": float(balance.max()),
                    "duplicates": same_gpu_duplicates(plans[who][0], gpus),
                    "seconds": best[who],
                }
            row["balance_gain"] = 1 - row["dsv3"]["balancedness"] / row["eplb"]["balancedness"]
            row["speedup"] = row["eplb"]["seconds"] / row["dsv3"]["seconds"]
            rows.append(row)
    return rows


def drift(steps: int, sigma: float, tolerances: list[float]) -> list[dict]:
    replicas, groups, nodes, gpus = CONFIGS["8 nodes, 64 GPUs, 320 slots"]
    weight = skewed_load("lognormal", seed=1)
    g = torch.Generator().manual_seed(2)
    start = rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
    current = {t: start for t in tolerances}
    fresh_prev = start
    rows = []
    for step in range(1, steps + 1):
        weight = weight * torch.exp(torch.randn(weight.shape, generator=g, dtype=torch.float64) * sigma)
        fresh = rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
        moved_fresh = sum(
            len(set(fresh[layer, s].tolist()) - set(fresh_prev[layer, s].tolist()))
            for layer in range(LAYERS)
            for s in torch.arange(replicas).view(gpus, -1)
        )
        row = {
            "step": step,
            "fresh": {"moved": moved_fresh, "balancedness": float(gpu_balance(weight, fresh, gpus).mean())},
            "stale": float(gpu_balance(weight, start, gpus).mean()),
        }
        fresh_prev = fresh
        for tol in tolerances:
            seconds, plan = timed(migrate_experts, weight, current[tol], groups, nodes, gpus, tol)
            current[tol] = plan.phy2log
            row[f"migrate {tol:g}"] = {
                "moved": int(plan.moved.sum()),
                "balancedness": float(gpu_balance(weight, plan.phy2log, gpus).mean()),
                "seconds": seconds,
            }
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eplb", required=True, help="path of an EPLB checkout (or its eplb.py)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--drift", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--out", default="benchmarks/out/bench_placement.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    eplb = load_eplb(args.eplb)
    rows = compare(eplb, args.repeats)
    print(
        f"\n{'load':<10} {'config':<28} {'EPLB bal':>8} {'dsv3 bal':>8} {'gain':>6} "
        f"{'EPLB dup':>8} {'dsv3 dup':>8} {'EPLB ms':>8} {'dsv3 ms':>8} {'speedup':>7}"
    )
    for r in rows:
        e, d = r["eplb"], r["dsv3"]
        print(
            f"{r['load']:<10} {r['config']:<28} {e['balancedness']:>8.3f} {d['balancedness']:>8.3f} "
            f"{r['balance_gain']:>6.1%} {e['duplicates']:>8d} {d['duplicates']:>8d} "
            f"{e['seconds'] * 1e3:>8.1f} {d['seconds'] * 1e3:>8.1f} {r['speedup']:>6.1f}x"
        )
    tolerances = [0.0, 0.02, 0.05]
    total = LAYERS * CONFIGS["8 nodes, 64 GPUs, 320 slots"][0]
    drifts = {}
    for sigma in args.drift:
        steps = drifts[str(sigma)] = drift(args.steps, sigma, tolerances)
        print(
            f"\nmigration, drifting load (8 nodes, lognormal, x exp(N(0, {sigma})) per step; {total} slots)"
        )
        header = f"{'step':>4} {'stale':>6} {'fresh moved':>11} {'bal':>6}"
        for tol in tolerances:
            header += f" {'tol ' + format(tol, 'g') + ' moved':>14} {'bal':>6}"
        print(header)
        for r in steps:
            fresh = r["fresh"]
            line = f"{r['step']:>4} {r['stale']:>6.3f} {fresh['moved']:>11d} {fresh['balancedness']:>6.3f}"
            for tol in tolerances:
                m = r[f"migrate {tol:g}"]
                line += f" {m['moved']:>14d} {m['balancedness']:>6.3f}"
            print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"plans": rows, "drift": drifts}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
