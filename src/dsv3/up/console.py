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


Loads = dict[str, dict[tuple[int, int], int]]  # shard -> (layer, expert) -> rows computed


def _per_shard(loads: Loads) -> dict[str, int]:
    return {shard: sum(slots.values()) for shard, slots in loads.items()}


def _balance(loads: Loads) -> float | None:
    """max / mean rows per shard (1.0 = perfect)."""
    totals = list(_per_shard(loads).values())
    mean = sum(totals) / len(totals) if totals else 0
    return max(totals) / mean if mean > 0 else None


def _layer_by_shard(loads: Loads) -> tuple[list[int], list[str], list[list[int]]]:
    layers = sorted({layer for slots in loads.values() for layer, _ in slots})
    shards = sorted(loads)
    grid = [[sum(n for (lay, _), n in loads[s].items() if lay == layer) for s in shards] for layer in layers]
    return layers, shards, grid


@dataclasses.dataclass
class Summary:
    settings: UpSettings
    train_dir: Path
    addresses: dict[str, str]
    completion: Completion
    before: Loads  # the shards' load before the rebalance ...
    after: Loads  # ... and after it, for the same prompts
    change: Any  # router_pb2.PlacementChange of the rebalance
    elapsed: float

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
        if c.acceptance is not None:
            drafted = c.accepted_drafts + c.rejected_drafts
            say(f"  drafts     MTP speculative decoding: {c.accepted_drafts} of {drafted} drafts accepted "
                f"({c.acceptance:.0%})")  # fmt: skip
        ch = self.change
        planned = f"planned shard load max/mean {ch.balancedness_before:.3f} -> {ch.balancedness_after:.3f}"
        if ch.slots_moved:
            say(f"  balance    rebalanced to placement v{ch.version}: {ch.slots_moved} slots moved in "
                f"{ch.seconds:.2f} s while serving; {planned}")  # fmt: skip
        else:
            say(f"  balance    placement v{ch.version} kept: no plan within tolerance moves load ({planned})")
        before, after = _balance(self.before), _balance(self.after)
        if before is not None and after is not None:
            say(f"             measured on the same prompts: {before:.3f} before -> {after:.3f} after")
        say(f"  completion {c.prompt!r} -> {c.text[:160]!r}")
        say(f"  artefacts  {out}/train (metrics.jsonl, hf/), {out}/checkpoints, {out}/logs, {out}/report.png")
        http = self.addresses["http"]
        say("  query it   (with --serve, while it runs):")
        body = '{"model": "dsv3-up", "prompt": "def ", "max_tokens": 32}'
        say(f"             curl {http}/v1/completions -H 'Content-Type: application/json' -d '{body}'")
        say(f"             python -c \"import openai; c = openai.OpenAI(base_url='{http}/v1', api_key='-'); "
            "print(c.completions.create(model='dsv3-up', prompt='def ', max_tokens=32)"
            ".choices[0].text)\"")  # fmt: skip
        say(
            "  further    --model 16b (a config.json) on a GPU box; on Kubernetes: helm install dsv3 "
            "charts/dsv3, then kubectl apply -f charts/dsv3/examples/"
        )

    def write_report(self, path: Path) -> None:
        """Loss curves and the per-layer load of each shard before and after the rebalance, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.train_dir / "metrics.jsonl")
        fig, (ax_loss, ax_before, ax_after) = plt.subplots(1, 3, figsize=(15, 4))
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], label="next-token loss")
        mtp = [(r["step"], r["mtp"]) for r in records if r.get("mtp") is not None]
        if mtp:
            ax_loss.plot(*zip(*mtp, strict=True), label="MTP loss")
        ax_loss.set(xlabel="step", ylabel="loss", title="training")
        ax_loss.legend()
        top = max([n for g in (self.before, self.after) for row in _layer_by_shard(g)[2] for n in row] or [1])
        for ax, loads, when in ((ax_before, self.before, "before"), (ax_after, self.after, "after")):
            layers, shards, grid = _layer_by_shard(loads)
            if grid:
                image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
                ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
                ax.set_xticks(range(len(shards)), shards, rotation=20, fontsize=8)
            balance = _balance(loads)
            title = f"rows per shard and layer, {when} rebalancing"
            ax.set(
                xlabel="expert shard",
                ylabel="layer",
                title=title + (f"\n(max/mean {balance:.2f})" if balance else ""),
            )
        fig.colorbar(image, ax=[ax_before, ax_after], label="rows computed per layer and shard")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
