"""`dsv3 demo`: the whole local loop on one CPU process, until `dsv3 up` drives the real services.

Trains the debug flavour on the standard library's source (MTP loss, sequence-wise balance loss,
aux-loss-free bias updates), saves a Hugging Face-format checkpoint, reloads it and generates text
with the compressed KV cache.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from dsv3.corpus import ByteBatches, decode, encode, stdlib_bytes
from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.loss import language_model_loss


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    steps: int = 300
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    mtp_weight: float = 0.3
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    output_dir: Path = Path("runs/demo")
    prompt: str = "def "
    new_tokens: int = 120
    seed: int = 0


def _evaluate(model: DeepSeekV3, data: ByteBatches) -> float:
    with torch.no_grad():
        ids = data.sample(16, held_out=True)
        return language_model_loss(model(ids, compute_mtp=False), ids).main.item()


def run_demo(settings: DemoSettings, log=print) -> dict[str, float]:
    """Train, checkpoint, reload, generate; returns the summary it prints."""
    torch.manual_seed(settings.seed)
    config = ModelConfig.flavour("debug")
    model = DeepSeekV3(config).train()
    data = ByteBatches(stdlib_bytes(), settings.seq_len, seed=settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.lr, total_steps=settings.steps, pct_start=0.1
    )
    initial = _evaluate(model, data)
    log(
        f"training the debug flavour ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"for {settings.steps} steps of {settings.batch}x{settings.seq_len} byte tokens"
    )
    start, seen = time.perf_counter(), 0
    for step in range(1, settings.steps + 1):
        ids = data.sample(settings.batch)
        out = model(ids)
        loss = language_model_loss(out, ids, settings.mtp_weight, settings.balance_alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        model.update_routing_bias(out.expert_loads, settings.bias_gamma)
        seen += ids.numel()
        if step % max(1, settings.steps // 10) == 0 or step == settings.steps:
            loads = out.expert_loads[: config.num_moe_layers].float()
            imbalance = (loads.max(-1).values / loads.mean(-1)).mean().item()
            log(
                f"  step {step:4d}  loss {loss.main.item():.3f}  mtp {loss.mtp.item():.3f}  "
                f"max/mean expert load {imbalance:.2f}  {seen / (time.perf_counter() - start):,.0f} tok/s"
            )
    final = _evaluate(model, data)
    model.save_pretrained(settings.output_dir)
    reloaded = DeepSeekV3.from_pretrained(settings.output_dir)
    prompt = torch.tensor([encode(settings.prompt)])
    text = decode(
        generate(
            reloaded,
            prompt,
            settings.new_tokens,
            temperature=0.8,
            top_k=20,
            generator=torch.Generator().manual_seed(settings.seed),
        )[0].tolist()
    )
    summary = {
        "held_out_loss_before": initial,
        "held_out_loss_after": final,
        "train_seconds": time.perf_counter() - start,
    }
    log(f"checkpoint: {settings.output_dir}/ (Hugging Face layout, reloaded for generation)")
    log(f"held-out loss {initial:.3f} -> {final:.3f} nats/byte")
    log("sample:\n" + text)
    return summary
