"""Is the loss gap between aux-loss-free balancing and the auxiliary loss larger than seed noise?

`bench_training_quality.py` compares the balancing methods on one seed. This runs the two closest
contenders, the aux-loss-free bias update (`--gamma`) and the classic auxiliary loss (`--alpha`, no
bias update), on several seeds (each seed: its own initial weights and batch order, the same for both
methods), same budget and held-out evaluation as that benchmark. Reported per seed and as mean and
standard deviation: held-out loss and MaxVio (last quarter of the steps), and the paired difference
in loss (aux-loss-free minus auxiliary loss, seed by seed). Writes JSON.

    python benchmarks/bench_balance_seeds.py [--seeds 0,1,2] [--steps 800] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from bench_training_quality import BATCH, SEQ, Variant, _run


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--gamma", type=float, default=1e-2, help="aux-loss-free bias update speed")
    parser.add_argument("--alpha", type=float, default=1e-2, help="auxiliary-loss weight of the baseline")
    parser.add_argument("--eval-sequences", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_balance_seeds.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [
        Variant(f"aux-loss-free (gamma {args.gamma:g})", {}, args.gamma, 1e-4),
        Variant(f"auxiliary loss (alpha {args.alpha:g})", {}, 0.0, args.alpha),
    ]
    runs: dict[str, list[dict]] = {m.name: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for method in methods:  # alternate: both methods of a seed see the same machine state
                r = _run(method, args.steps, Path(tmp), args.eval_sequences, seed)
                r.update(seed=seed)
                runs[method.name].append(r)
                print(f"  seed {seed} {method.name}: held-out {r['held_out_after']:.4f}, "
                      f"MaxVio {r['max_vio_last_quarter']:.3f}", flush=True)  # fmt: skip
    free, aux = (runs[m.name] for m in methods)
    gaps = [f["held_out_after"] - a["held_out_after"] for f, a in zip(free, aux, strict=True)]
    print(
        f"{datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, {args.steps} steps x {BATCH} x {SEQ} tokens, seeds {seeds}"
    )
    print(f"{'method':>30} | held-out loss (mean ± sd) | MaxVio (mean ± sd) | per seed")
    summary = {}
    for name, rs in runs.items():
        loss = _mean_std([r["held_out_after"] for r in rs])
        vio = _mean_std([r["max_vio_last_quarter"] for r in rs])
        summary[name] = {"held_out": loss, "max_vio": vio}
        per_seed = ", ".join(f"{r['held_out_after']:.4f}/{r['max_vio_last_quarter']:.3f}" for r in rs)
        print(f"{name:>30} | {loss[0]:.4f} ± {loss[1]:.4f} | {vio[0]:.3f} ± {vio[1]:.3f} | {per_seed}")
    gap = _mean_std(gaps)
    print(f"paired loss gap (aux-loss-free - auxiliary), per seed {[round(g, 4) for g in gaps]}: "
          f"{gap[0]:+.4f} ± {gap[1]:.4f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for rs in runs.values():
        for r in rs:
            r.pop("loss_curve"), r.pop("max_vio_curve")
    report = {"date": str(datetime.date.today()), "steps": args.steps, "seeds": seeds, "runs": runs,
              "summary": summary, "paired_loss_gaps": gaps}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
