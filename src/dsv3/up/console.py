"""What `dsv3 up` shows: a line per phase, the training progress, the closing summary and report.png."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv3.up.probes import Completion
    from dsv3.up.run import UpSettings

_STARTED = time.monotonic()


def say(text: str) -> None:
    print(text, flush=True)


def phase(title: str) -> None:
    say(f"[{time.monotonic() - _STARTED:6.1f}s] == {title}")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The trainer's metrics.jsonl; the last record of each step (a resumed run logs steps again)."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


class TrainingProgress:
    """A tqdm bar (loss, tokens/s) on a terminal, a line every 10% otherwise; fed from metrics.jsonl."""

    def __init__(self, metrics: Path, total: int) -> None:
        self.metrics, self.total = metrics, total
        self.bar = None
        self.reported = 0
        self.interactive = sys.stdout.isatty()

    def __enter__(self) -> TrainingProgress:
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.refresh()
        if self.bar is not None:
            self.bar.close()

    def refresh(self) -> None:
        records = read_metrics(self.metrics)
        if not records:
            return
        last = records[-1]
        if self.bar is not None:
            self.bar.update(last["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
        elif last["step"] > self.reported and (
            last["step"] >= self.reported + max(1, self.total // 10) or last["step"] == self.total
        ):
            self.reported = last["step"]
            rate = last["tokens_per_s"]
            say(f"  step {last['step']}/{self.total}  loss {last['loss']:.4f}  {rate:,.0f} tokens/s")


@dataclasses.dataclass
class Summary:
    settings: UpSettings
    train_dir: Path
    addresses: dict[str, str]
    completion: Completion
    loads: dict[tuple[int, int], int]
    elapsed: float

    def _balance(self) -> float | None:
        """max / mean rows per expert over the MoE layers that ran (1.0 = perfect)."""
        if not self.loads:
            return None
        values = list(self.loads.values())
        mean = sum(values) / len(values)
        return max(values) / mean if mean > 0 else None

    def print(self) -> None:
        records = read_metrics(self.train_dir / "metrics.jsonl")
        out = self.settings.output_dir
        say("")
        say(f"dsv3 up: done in {self.elapsed:.0f} s")
        if records:
            first, last = records[0], records[-1]
            rate = max(r["tokens_per_s"] for r in records[-10:])
            say(f"  training   loss {first['loss']:.3f} -> {last['loss']:.3f} over {last['step']} steps, "
                f"{rate:,.0f} tokens/s (2 processes, expert parallel)")  # fmt: skip
        c = self.completion
        say(f"  serving    {c.tokens} tokens in {c.seconds:.2f} s ({c.tokens_per_s:.1f} tokens/s) through "
            f"the router and {self.settings.shards} expert shards")  # fmt: skip
        balance = self._balance()
        if balance is not None:
            say(f"  balance    expert load max/mean {balance:.2f} over {len(self.loads)} (layer, expert)s")
        say(f"  completion {c.prompt!r} -> {c.text[:160]!r}")
        say(f"  artefacts  {out}/train (metrics.jsonl, hf/), {out}/checkpoints, {out}/logs, {out}/report.png")
        router = self.addresses["router"]
        say("  query it   (with --serve, while it runs):")
        request = '{"prompt_ids": [100, 101, 102, 32], "max_tokens": 32}'
        say(f"             grpcurl -plaintext -d '{request}' {router} dsv3.rpc.v1.RouterService/Generate")
        say(
            "  further    --model 16b (a config.json) on a GPU box; on Kubernetes: helm install dsv3 "
            "charts/dsv3, then kubectl apply -f charts/dsv3/examples/"
        )

    def write_report(self, path: Path) -> None:
        """Loss curves and the per-layer expert-load heatmap, as a PNG next to the artefacts."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.train_dir / "metrics.jsonl")
        fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], label="next-token loss")
        mtp = [(r["step"], r["mtp"]) for r in records if r.get("mtp") is not None]
        if mtp:
            ax_loss.plot(*zip(*mtp, strict=True), label="MTP loss")
        ax_loss.set(xlabel="step", ylabel="loss", title="training")
        ax_loss.legend()
        layers = sorted({layer for layer, _ in self.loads})
        experts = 1 + max((expert for _, expert in self.loads), default=0)
        grid = [[self.loads.get((layer, e), 0) for e in range(experts)] for layer in layers]
        if grid:
            image = ax_load.imshow(grid, aspect="auto", cmap="viridis")
            fig.colorbar(image, ax=ax_load, label="rows computed")
            ax_load.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax_load.set(xlabel="routed expert", ylabel="layer", title="expert load while serving")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
