"""Training tokens/s of the dsv3 trainer (one process) against transformers' DeepseekV3ForCausalLM + AdamW.

Same config (`benchmarks/train_small.json`: hidden 256, 4 layers with 1 dense, 16 experts top-4 of 4
groups, MLA q 96 / kv 64), same initial weights, same batches (8 x 256 byte tokens of the stdlib corpus),
same AdamW settings and gradient clipping. The trainer runs its real loop (`dsv3.trainer.loop.train`,
which also does the balance loss and the bias update); the transformers loop is the usual
forward / cross-entropy / backward / clip / step. Two more rows run the trainer with
`--concurrent-passes 1` (one forward/backward pass per micro-batch) and with `DSV3_CPU_KERNELS=0`
(torch's ops instead of the fused C kernels of `dsv3.kernels.cpu_fused`), so what each adds shows in the
same run. Runs alternate so machine noise hits all alike; the best round of each is kept.
With `--isolate` every round runs in a fresh process, so each loop runs as it ships: the trainer sets
its malloc thresholds (`dsv3.trainer.allocator`) and transformers keeps glibc's defaults; without it
all share this process, and the transformers rounds after the first trainer round get the trainer's
malloc settings too (the conservative comparison).

Then the memory options of the trainer, same config and batch: activation checkpointing `none`,
`full`, `moe` and micro-batches 2 and 4. Tokens/s is the trainer's real loop, the modes alternating,
best of the rounds. Peak memory is the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs after malloc_trim) of one forward/backward step (the trainer's `forward_backward`)
above the process's size just before it, with the model and its gradient buffers already there, after a
warm-up step, each mode in a fresh process: the step's activations and temporaries.

    python benchmarks/bench_training.py [--rounds 3] [--steps 20] [--threads 2] [--isolate]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import psutil
import torch

from dsv3.kernels import cpu_fused
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.tokenizer import ByteTokenizer, token_stream
from dsv3.trainer.config import TrainConfig
from dsv3.trainer.data import PackedSequences
from dsv3.trainer.faults import FaultInjector
from dsv3.trainer.loop import forward_backward, train

CONFIG = Path(__file__).with_name("train_small.json")
BATCH, SEQ, LR = 8, 256, 1e-3
GOAL = 1.5


MEMORY_MODES = {
    "none": {},
    "full": {"activation_checkpointing": "full"},
    "moe": {"activation_checkpointing": "moe"},
    "micro-batches 2": {"micro_batches": 2},
    "micro-batches 4": {"micro_batches": 4},
}


def _trainer_round(steps: int, out: Path, **options) -> float:
    config = TrainConfig(
        model=str(CONFIG),
        steps=steps,
        batch=BATCH,
        seq_len=SEQ,
        lr=LR,
        warmup_steps=0,
        eval_sequences=0,
        progress="none",
        output_dir=out,
        seed=0,
        **options,
    )
    return train(config).tokens_per_s


def _trainer_round_torch_ops(steps: int, out: Path) -> float:
    """The trainer with its fused C kernels off (`DSV3_CPU_KERNELS=0`): torch's ops everywhere."""
    with mock.patch.dict(os.environ, {cpu_fused.ENABLE_ENV: "0"}):
        return _trainer_round(steps, out)


def _step_peak_mib(options: dict, threads: int) -> float:
    """In a fresh process: the RSS high-water mark of one training step above the RSS just before it."""
    from dsv3.model.recompute import apply_activation_checkpointing

    torch.set_num_threads(threads)
    config = TrainConfig(model=str(CONFIG), batch=BATCH, seq_len=SEQ, **options)
    torch.manual_seed(0)
    model = DeepSeekV3(config.model_config()).train()
    apply_activation_checkpointing(model, config.activation_checkpointing)
    for p in model.parameters():  # gradients exist before the step, as in the loop after step 1
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    peaks = []
    for step in range(3):  # step 0 warms up (lazy imports and one-time buffers); the best of 1 and 2 counts
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS: RSS is what is live
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        before = psutil.Process().memory_info().rss
        forward_backward(model, ids, config, 1, contextlib.nullcontext, FaultInjector([], 0, 0, BATCH), 0)
        if step:
            peaks.append((_high_water_mark() - before) / 2**20)
    return min(peaks)


def _high_water_mark() -> int:
    """This process's peak RSS in bytes: VmHWM (per address space, so fresh after the spawn's exec;
    `ru_maxrss` is not: Linux carries it over from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _memory_table(rounds: int, steps: int, threads: int, tmp: Path) -> dict[str, dict[str, float]]:
    spawn = multiprocessing.get_context("spawn")
    table = {name: {"tokens_per_s": 0.0, "peak_mib": float("inf")} for name in MEMORY_MODES}
    for _ in range(rounds):
        for name, options in MEMORY_MODES.items():
            rate = _trainer_round(steps, tmp / "mem", **options)
            table[name]["tokens_per_s"] = max(table[name]["tokens_per_s"], rate)
            with spawn.Pool(1) as pool:
                peak = pool.apply(_step_peak_mib, (options, threads))
            table[name]["peak_mib"] = min(table[name]["peak_mib"], peak)
    return table


def _transformers_round(steps: int, weights: Path, data: PackedSequences) -> float:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(weights, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.perf_counter()
    for step in range(steps):
        ids = data.batch(step * BATCH, BATCH, 0, 1)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return steps * BATCH * SEQ / (time.perf_counter() - start)


def _data(config: ModelConfig) -> PackedSequences:
    return PackedSequences(token_stream("", ByteTokenizer()), SEQ, 0, 0.05, config.vocab_size)


def _in_fresh_process(threads: int, fn, *args) -> float:
    """`fn(*args)` in a spawned interpreter with `threads` torch threads (glibc malloc at its defaults
    unless `fn` changes them)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_with_threads, (threads, fn, *args))


def _with_threads(threads: int, fn, *args) -> float:
    torch.set_num_threads(threads)
    return fn(*args)


def _transformers_round_fresh(steps: int, weights: Path) -> float:
    return _transformers_round(steps, weights, _data(ModelConfig.from_hf_config(CONFIG)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--isolate", action="store_true", help="every round in a fresh process")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_training.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    model_config = ModelConfig.from_hf_config(CONFIG)
    data = _data(model_config)
    best = {"dsv3 trainer": 0.0, "transformers + AdamW": 0.0, "dsv3, one pass": 0.0, "dsv3, torch ops": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # the trainer's initial weights (it seeds the same way)
        DeepSeekV3(model_config).save_pretrained(Path(tmp) / "init")
        run, weights = Path(tmp) / "run", Path(tmp) / "init"
        transformers_round = (
            functools.partial(_transformers_round_fresh, args.steps, weights)
            if args.isolate
            else functools.partial(_transformers_round, args.steps, weights, data)
        )
        contenders = {
            "dsv3 trainer": functools.partial(_trainer_round, args.steps, run),
            "transformers + AdamW": transformers_round,
            "dsv3, one pass": functools.partial(_trainer_round, args.steps, run, concurrent_passes=1),
            "dsv3, torch ops": functools.partial(_trainer_round_torch_ops, args.steps, run),
        }
        for _ in range(args.rounds):
            for name, contender in contenders.items():
                rate = _in_fresh_process(args.threads, contender) if args.isolate else contender()
                best[name] = max(best[name], rate)
        memory = _memory_table(args.rounds, args.steps, args.threads, Path(tmp))
    speedup = best["dsv3 trainer"] / best["transformers + AdamW"]
    print(
        f"{datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads, fp32, batch {BATCH} x {SEQ}, "
        f"{args.steps} steps per round, best of {args.rounds}"
        f"{', each round in a fresh process' if args.isolate else ', one process'}"
    )
    for name, rate in best.items():
        print(f"{name:>22} | {rate:>8.0f} tokens/s")
    print(f"speed-up {speedup:.2f}x (goal >= {GOAL}x: {'met' if speedup >= GOAL else 'NOT met'})")
    print(
        f"without concurrent passes (--concurrent-passes 1): "
        f"{best['dsv3, one pass'] / best['transformers + AdamW']:.2f}x; without the fused C kernels "
        f"(DSV3_CPU_KERNELS=0): {best['dsv3, torch ops'] / best['transformers + AdamW']:.2f}x"
    )
    header = f"{'tokens/s':>8} | {'vs none':>7} | {'step peak MiB':>13} | {'vs none':>7}"
    print(f"\n{'memory option':>22} | {header}")
    plain = memory["none"]
    for name, row in memory.items():
        print(
            f"{name:>22} | {row['tokens_per_s']:>8.0f} | {row['tokens_per_s'] / plain['tokens_per_s']:>6.2f}x"
            f" | {row['peak_mib']:>13.1f} | {row['peak_mib'] / plain['peak_mib']:>6.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "tokens_per_s": best,
                "speedup": speedup,
                "memory_options": memory,
                "threads": args.threads,
                "isolated_rounds": args.isolate,
                "date": str(datetime.date.today()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
