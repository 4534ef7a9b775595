"""dsv3's training throughput at two commits, side by side in one run: is a change a regression?

Checks the base commit out into a git worktree beside this one, then runs each commit's own
`benchmarks/bench_model.py` against its own sources (PYTHONPATH), alternating base and head so that
machine noise hits both alike, and keeps each row's best. transformers runs in both as a control: its
figures should agree between the two columns when the machine was steady.

    python benchmarks/compare_commits.py [--base HEAD~1] [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("src", "protos/src", "services/checkpoint/src")  # whichever exist at that commit


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _run_bench(tree: Path, repeats: int, out: Path) -> dict:
    paths = [str(tree / d) for d in SOURCE_DIRS if (tree / d).is_dir()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    probe = "import dsv3.model.transformer as t; print(t.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    if not Path(where.stdout.strip()).is_relative_to(tree):  # the other tree's code would be timed
        raise SystemExit(f"{tree}: dsv3 imports from {where.stdout.strip()}")
    subprocess.run(
        [
            sys.executable,
            str(tree / "benchmarks" / "bench_model.py"),
            "--repeats",
            str(repeats),
            "--out",
            str(out),
        ],
        env=env,
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of base and head")
    parser.add_argument("--repeats", type=int, default=3, help="bench_model.py --repeats per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/compare_commits.json")
    args = parser.parse_args()
    base_sha = _git("rev-parse", args.base)
    head_sha = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    best: dict[str, dict[tuple[int, int], dict[str, float]]] = {"base": {}, "head": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        _git("worktree", "add", "--detach", str(base_tree), base_sha)
        try:
            trees = {"base": base_tree, "head": ROOT}
            for round_index in range(args.rounds):
                for name in ("base", "head") if round_index % 2 == 0 else ("head", "base"):
                    report = _run_bench(trees[name], args.repeats, Path(tmp) / f"{name}.json")
                    for row in report["rows"]:
                        key = (row["batch"], row["seq"])
                        kept = best[name].setdefault(key, {"dsv3": 0.0, "transformers": 0.0})
                        kept["dsv3"] = max(kept["dsv3"], row["dsv3_tokens_per_s"])
                        kept["transformers"] = max(kept["transformers"], row["transformers_tokens_per_s"])
                    print(f"round {round_index + 1}/{args.rounds}: {name} done", file=sys.stderr)
        finally:
            _git("worktree", "remove", "--force", str(base_tree))

    suffix = " (+ uncommitted)" if dirty else ""
    print(f"dsv3 fwd+bwd tokens/s, base {base_sha[:8]} vs head {head_sha[:8]}{suffix}")
    print(f"best of {args.rounds} alternated runs x {args.repeats} repeats; transformers as the control")
    columns = ("base", "head", "head/base", "HF base", "HF head")
    print(f"{'batch x seq':>12} | " + " | ".join(f"{c:>9}" for c in columns))
    rows = []
    for key in sorted(best["head"], key=lambda k: k[1]):
        b, h = best["base"][key], best["head"][key]
        row = {
            "batch": key[0],
            "seq": key[1],
            "base_tokens_per_s": b["dsv3"],
            "head_tokens_per_s": h["dsv3"],
            "head_over_base": h["dsv3"] / b["dsv3"],
            "transformers_base_run": b["transformers"],
            "transformers_head_run": h["transformers"],
        }
        rows.append(row)
        print(
            f"{f'{key[0]} x {key[1]}':>12} | {b['dsv3']:>9.0f} | {h['dsv3']:>9.0f} | "
            f"{row['head_over_base']:>8.3f}x | {b['transformers']:>9.0f} | {h['transformers']:>9.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "base": base_sha,
                "head": head_sha,
                "head_dirty": dirty,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
