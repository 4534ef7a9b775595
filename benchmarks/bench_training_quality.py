"""What the MoE and its balancing buy, at a fixed token budget on the default corpus (issue 14).

Runs of the real trainer loop (`dsv3.trainer.loop.train`, one process), same seed, same batches,
same schedule, each `--steps` x 8 x 256 byte tokens of the Python standard library's source:

- **moe, aux-loss-free**: `benchmarks/train_small.json` as the trainer runs it (bias update speed
  gamma `--gammas`, 1e-3 as the DeepSeek-V3 report and 1e-2 for a run this short; the tiny
  sequence-wise loss alpha 1e-4);
- **moe, auxiliary loss**: the same model balanced the classic way: no bias update (gamma 0) and an
  expert-level balance loss of weight `--aux-alphas` (DeepSeek-V2's per-sequence f_i * P_i loss; 1e-2
  the usual weight, 1e-3 a lighter one);
- **moe, unbalanced**: neither (shows what the balancing is fighting);
- **dense**: every layer a dense SwiGLU whose width equals the MoE layer's activated width
  ((top-k + shared) x expert width = 640), i.e. at least the MoE's activated parameters.

Reported, as the aux-loss-free paper does: held-out loss (`--eval-sequences` held-out sequences, the
trainer's own evaluation) and MaxVio (max expert load / mean load - 1, per layer, averaged over layers
and over the last quarter of the steps: the paper's MaxVio_batch). Writes JSON and a PNG of the loss
and MaxVio curves next to it.

    python benchmarks/bench_training_quality.py [--steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from dsv3.trainer.config import TrainConfig
from dsv3.trainer.loop import train

CONFIG = Path(__file__).with_name("train_small.json")
BATCH, SEQ, LR = 8, 256, 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    model: dict  # overrides of train_small.json
    bias_gamma: float
    balance_alpha: float


def _variants(aux_alphas: list[float], gammas: list[float]) -> list[Variant]:
    base = json.loads(CONFIG.read_text())
    activated = (base["num_experts_per_tok"] + base["n_shared_experts"]) * base["moe_intermediate_size"]
    dense = {"first_k_dense_replace": base["num_hidden_layers"], "intermediate_size": activated}
    return [
        *(Variant(f"moe, aux-loss-free (gamma {g:g})", {}, g, 1e-4) for g in gammas),
        *(Variant(f"moe, auxiliary loss (alpha {a:g})", {}, 0.0, a) for a in aux_alphas),
        Variant("moe, unbalanced", {}, 0.0, 0.0),
        Variant("dense (same activated width)", dense, 0.0, 0.0),
    ]


def _run(variant: Variant, steps: int, tmp: Path, eval_sequences: int, seed: int = 0) -> dict:
    """One run of the trainer; `seed` sets the initial weights and the order of the batches."""
    config_path = tmp / f"{abs(hash(variant.name))}.json"
    config_path.write_text(json.dumps({**json.loads(CONFIG.read_text()), **variant.model}))
    out = tmp / f"run-{abs(hash(variant.name))}-{seed}"
    summary = train(
        TrainConfig(
            model=str(config_path),
            steps=steps,
            batch=BATCH,
            seq_len=SEQ,
            lr=LR,
            warmup_steps=min(20, steps // 10),
            bias_gamma=variant.bias_gamma,
            balance_alpha=variant.balance_alpha,
            eval_sequences=eval_sequences,
            progress="none",
            output_dir=out,
            seed=seed,
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    max_vio = [sum(r["max_vio"]) / len(r["max_vio"]) if r["max_vio"] else None for r in records]
    tail = [v for v in max_vio[-max(1, len(max_vio) // 4) :] if v is not None]
    return {
        "name": variant.name,
        "held_out_before": summary.held_out_before,
        "held_out_after": summary.held_out_after,
        "max_vio_last_quarter": sum(tail) / len(tail) if tail else None,
        "tokens_per_s": summary.tokens_per_s,
        "loss_curve": [r["loss"] for r in records],
        "max_vio_curve": max_vio,
    }


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        curve = r["loss_curve"]
        smooth = [
            sum(curve[max(0, i - 9) : i + 1]) / len(curve[max(0, i - 9) : i + 1]) for i in range(len(curve))
        ]
        ax_loss.plot(range(1, len(curve) + 1), smooth, label=r["name"])
        if r["max_vio_last_quarter"] is not None:
            ax_vio.plot(range(1, len(r["max_vio_curve"]) + 1), r["max_vio_curve"], label=r["name"])
    ax_loss.set(xlabel="step", ylabel="training loss (10-step mean)", title="loss")
    ax_vio.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="expert load balance")
    ax_vio.set_yscale("log")
    for ax in (ax_loss, ax_vio):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--aux-alphas", default="1e-2,1e-3", help="auxiliary-loss weights of the classic baselines"
    )
    parser.add_argument("--eval-sequences", type=int, default=128, help="held-out sequences evaluated")
    parser.add_argument("--gammas", default="1e-3,1e-2", help="aux-loss-free bias update speeds to run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_training_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gammas = [float(g) for g in args.gammas.split(",") if g.strip()]
    alphas = [float(a) for a in args.aux_alphas.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for variant in _variants(alphas, gammas):
            results.append(_run(variant, args.steps, Path(tmp), args.eval_sequences))
            print(f"  {variant.name}: held-out {results[-1]['held_out_after']:.4f}", flush=True)
    tokens = args.steps * BATCH * SEQ
    print(
        f"{datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, fp32, {args.steps} steps x {BATCH} x {SEQ} = {tokens:,} tokens each"
    )
    print(f"{'run':>36} | held-out loss | MaxVio (last 1/4) | tokens/s")
    for r in results:
        vio = "-" if r["max_vio_last_quarter"] is None else f"{r['max_vio_last_quarter']:.3f}"
        print(f"{r['name']:>36} | {r['held_out_after']:>13.4f} | {vio:>17} | {r['tokens_per_s']:>8.0f}")
    frees, auxes, dense = results[: len(gammas)], results[len(gammas) : -2], results[-1]
    free = min(frees, key=lambda r: r["max_vio_last_quarter"])  # the best-balanced bias update speed
    verdicts = {
        "best_aux_free": free["name"],
        "moe_beats_dense": free["held_out_after"] < dense["held_out_after"],
    }
    for alpha, aux in zip(alphas, auxes, strict=True):  # _variants lists them in --aux-alphas order
        verdicts[f"lower_max_vio_than_alpha_{alpha:g}"] = (
            free["max_vio_last_quarter"] < aux["max_vio_last_quarter"]
        )
        verdicts[f"loss_not_worse_than_alpha_{alpha:g}"] = (
            free["held_out_after"] <= aux["held_out_after"] * 1.002
        )
    print(", ".join(f"{k}: {v}" for k, v in verdicts.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    _plot(results, png)
    args.out.write_text(
        json.dumps(
            {
                "date": str(datetime.date.today()),
                "steps": args.steps,
                "tokens": tokens,
                "threads": args.threads,
                "results": results,
                "verdicts": verdicts,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
