"""The same run on 1 process, on 2 (expert parallel 2) and on 4 (data parallel 2 x expert parallel 2):
same global batch and seed, the same losses step by step (float32, debug flavour, MTP, sequence-wise
balance loss and per-step bias updates on). A wrong gradient reduction group, a rank reading the wrong
slice, loads not summed over every rank or a ZeRO owner not broadcasting all break it within a few steps."""

from __future__ import annotations

from pathlib import Path

STEPS = 24


def test_one_two_and_four_processes_give_the_same_losses(tmp_path: Path, launch) -> None:
    runs: dict[int, dict[int, float]] = {}
    for world, ep in ((1, 1), (2, 2), (4, 2)):
        out = tmp_path / f"world{world}"
        result = launch.run(world, ["--steps", str(STEPS), "--ep", str(ep), "--output-dir", str(out)])
        assert f"world {world} (dp {world // ep} x ep {ep})" in result.stderr
        runs[world] = launch.losses(out)
        assert sorted(runs[world]) == list(range(1, STEPS + 1))
    for world in (2, 4):
        assert launch.max_rel_diff(runs[1], runs[world], range(1, STEPS + 1)) <= 1e-4, world
    records = launch.metrics(tmp_path / "world4")
    assert all(r["mtp"] is not None and r["balance"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it trained
    # The routing biases moved (per-layer MaxVio is reported from the global loads).
    assert len(records[0]["max_vio"]) == 3 and all(v >= 0 for v in records[-1]["max_vio"])
