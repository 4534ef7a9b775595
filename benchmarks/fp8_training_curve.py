"""FP8 vs bf16 training of the debug flavour on a GPU: does the FP8 recipe track the bf16 loss?

Two runs from the same initial weights on the same batches (byte tokens of the Python standard library):
fp32 master weights, AdamW, bf16 autocast; the second run calls `enable_fp8_training()` first, so its
attention projections, dense MLPs, shared experts and MTP projections (`FP8Linear`) and its routed
experts (`ops.grouped_swiglu_fp8_training`; `--bf16-experts` keeps them bf16) run their forward and both
backward GEMMs in block-scaled FP8. Prints the loss curves (means over windows of steps)
and the relative gap over the last window; writes JSON. Needs CUDA: exits with status 2 without it.

    python benchmarks/fp8_training_curve.py [--steps 400] [--out benchmarks/out/fp8_training_curve.json]
    python benchmarks/fp8_training_curve.py --dry-run   # CPU: the script runs end to end
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from dsv3.corpus import ByteBatches, stdlib_bytes
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.loss import language_model_loss


def train(
    model: DeepSeekV3, steps: int, batch: int, seq_len: int, lr: float, device: str = "cuda"
) -> tuple[list[float], float]:
    """Per-step training losses and the final held-out loss."""
    data = ByteBatches(stdlib_bytes(), seq_len, seed=0)  # the same batches for every run
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        ids = data.sample(batch).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(ids)
            loss = language_model_loss(out, ids, mtp_weight=0.3)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        model.update_routing_bias(out.expert_loads, 1e-3)
        losses.append(loss.main.item())
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        ids = data.sample(64 if device == "cuda" else 2, held_out=True).to(device)
        held_out = language_model_loss(model(ids, compute_mtp=False), ids).main.item()
    return losses, held_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fp8_training_curve.json"))
    parser.add_argument(
        "--bf16-experts", action="store_true", help="keep the routed experts bf16 in the FP8 run (as before)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, 4 steps of 2x32: the script runs, nothing measured",
    )
    args = parser.parse_args()
    device = "cuda"
    if args.dry_run:
        device, args.steps, args.batch, args.seq_len, args.window = "cpu", 4, 2, 32, 2
    elif not torch.cuda.is_available():
        print("fp8_training_curve needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    initial = DeepSeekV3(ModelConfig.flavour("debug")).to(device).train()
    runs = {}
    for name in ("bf16", "fp8"):
        model = copy.deepcopy(initial)
        if name == "fp8":
            converted = model.enable_fp8_training(routed_experts=not args.bf16_experts)
        torch.manual_seed(1)
        runs[name] = train(model, args.steps, args.batch, args.seq_len, args.lr, device)
    windows = range(0, args.steps, args.window)
    device = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"debug flavour on {device}, {args.steps} steps of {args.batch}x{args.seq_len}")
    print(f"FP8 modules: {len(converted)} ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in converted}))})")
    print(f"{'steps':>11} | {'bf16 loss':>9} | {'fp8 loss':>9} | {'gap':>7}")
    curve = []
    for start in windows:
        bf16, fp8 = (sum(runs[n][0][start : start + args.window]) / args.window for n in ("bf16", "fp8"))
        gap = (fp8 - bf16) / bf16
        curve.append({"first_step": start + 1, "bf16": bf16, "fp8": fp8, "relative_gap": gap})
        print(f"{start + 1:>5}-{start + args.window:<5} | {bf16:>9.4f} | {fp8:>9.4f} | {gap:>+7.2%}")
    held = {n: runs[n][1] for n in runs}
    print(
        f"held-out loss: bf16 {held['bf16']:.4f}, fp8 {held['fp8']:.4f} "
        f"({(held['fp8'] - held['bf16']) / held['bf16']:+.2%})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device,
        "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "fp8_modules": converted,
        "curve": curve,
        "held_out": held,
        "losses": {n: runs[n][0] for n in runs},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
