"""Forward+backward training throughput of dsv3's DeepSeek-V3 vs transformers' DeepseekV3ForCausalLM.

Both models get the same small MoE config and the same weights (ours saved, theirs loaded from it);
the logits are checked to agree before timing. Runs alternate between the two implementations in
one process so machine noise hits both alike; the best of N runs is reported.

Every row is 2048 tokens per step. The goal (>= 1.5x) is read at the config's training length, the
1024-token context its YaRN scaling extends (`original_max_position_embeddings`); shorter and longer
sequences are printed beside it to show how the ratio moves with sequence length.

    python benchmarks/bench_model.py [--repeats 5] [--threads 2] [--out benchmarks/out/bench_model.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dsv3.model import DeepSeekV3, ModelConfig

# A DeepSeek-V3-shaped model scaled down: 64 fine-grained experts, top-6 of 8 groups (4 kept),
# one dense layer then MoE layers, MLA with q/kv LoRA and YaRN.
BENCH_CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=64,
    n_shared_experts=1,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=4096,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)
SHAPES = [(8, 256), (2, 1024), (1, 2048)]  # (batch, sequence): 2048 tokens per step each
GOAL_SPEEDUP = 1.5


def _train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ).backward()


def _best_seconds(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(models, float("inf"))
    for model in models.values():
        _train_step(model, ids)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _train_step(model, ids)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_model.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.from_hf_config(ModelConfig.flavour("debug").to_hf_config() | BENCH_CONFIG)
    ours = DeepSeekV3(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    probe = torch.randint(0, config.vocab_size, (1, 64))
    with torch.no_grad():
        diff = (ours(probe).logits - theirs(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"implementations disagree (max |logit diff| = {diff:.2e}); refusing to time them")

    goal_seq = config.rope.original_max_position_embeddings or config.max_position_embeddings
    rows = []
    print(
        f"dsv3 vs transformers {transformers.__version__} ({theirs.config._attn_implementation}), "
        f"torch {torch.__version__}, {args.threads} threads, fp32, fwd+bwd, best of {args.repeats}"
    )
    print(f"{'batch x seq':>12} | {'dsv3 tok/s':>10} | {'HF tok/s':>10} | {'speed-up':>8} | goal row")
    for batch, seq in SHAPES:
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        best = _best_seconds({"dsv3": ours, "transformers": theirs}, ids, args.repeats)
        tokens = batch * seq
        row = {
            "batch": batch,
            "seq": seq,
            "dsv3_tokens_per_s": tokens / best["dsv3"],
            "transformers_tokens_per_s": tokens / best["transformers"],
            "speedup": best["transformers"] / best["dsv3"],
            "goal_row": seq == goal_seq,
        }
        rows.append(row)
        print(
            f"{f'{batch} x {seq}':>12} | {row['dsv3_tokens_per_s']:>10.0f} | "
            f"{row['transformers_tokens_per_s']:>10.0f} | {row['speedup']:>7.2f}x | "
            f"{'yes' if row['goal_row'] else ''}"
        )
    goal = [row for row in rows if row["goal_row"]]
    goal_met = bool(goal) and all(row["speedup"] >= GOAL_SPEEDUP for row in goal)
    print(f"goal: >= {GOAL_SPEEDUP}x at {goal_seq}-token sequences: {'met' if goal_met else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": BENCH_CONFIG,
                "threads": args.threads,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "machine": platform.processor() or platform.machine(),
                "logit_max_abs_diff": diff,
                "goal": {"speedup": GOAL_SPEEDUP, "seq": goal_seq, "met": goal_met},
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
