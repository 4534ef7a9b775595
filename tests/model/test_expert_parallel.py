"""Expert parallelism is the same function: the MoE layer under `AllToAllDispatcher` on W real processes
(torchrun, gloo) gives the single-process output and gradients (float32, max abs diff <= 1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3.model import ModelConfig
from dsv3.model.moe import MoE

WORKER = Path(__file__).with_name("ep_worker.py")
TOLERANCE = 1e-5


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item() if a.numel() else 0.0


def _config() -> dict:
    # 16 experts in 4 groups, top-4 of 2 kept groups: the debug flavour's routing, smaller widths.
    return ModelConfig.flavour("debug").to_hf_config() | {"hidden_size": 32, "moe_intermediate_size": 16}


def _run_ranks(
    tmp_path: Path,
    world: int,
    tokens_per_rank: list[int],
    silenced: list[int],
    fp8: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[float, torch.Tensor]:
    """Write the case, run `world` ranks, compare every rank with the single-process layer.

    Returns the largest difference seen (outputs, input and parameter gradients) and the rows each
    rank's experts received (from the single-process routing).
    """
    config = ModelConfig.from_hf_config(_config())
    torch.manual_seed(world)
    layer = MoE.from_config(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():  # experts nobody may choose: their owners receive no row for them
        layer.gate.e_score_correction_bias[silenced] = -100.0
    if fp8:
        layer.experts.enable_fp8()
    hidden = config.hidden_size
    inputs = [torch.randn(1, t, hidden) for t in tokens_per_rank]
    probes = [torch.randn(1, t, hidden) for t in tokens_per_rank]
    torch.save(
        {"config": _config(), "state": layer.state_dict(), "inputs": inputs, "probes": probes, "fp8": fp8},
        tmp_path / "case.pt",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            str(WORKER),
            str(tmp_path / "case.pt"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The single-process layer on every rank's tokens at once.
    x_all = torch.cat(inputs, dim=1).requires_grad_(True)
    y_all, routing = layer(x_all)
    (y_all * torch.cat(probes, dim=1)).sum().backward()
    chosen = torch.bincount(routing.ids_TK.flatten(), minlength=config.n_routed_experts)
    assert (chosen[silenced] == 0).all() and (chosen > 0).sum() >= config.n_routed_experts - len(silenced)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    local = config.n_routed_experts // world
    starts = [0, *torch.tensor(tokens_per_rank).cumsum(0).tolist()]
    replicated: dict[str, torch.Tensor] = {}
    worst = 0.0
    for r, got in enumerate(ranks):
        lo, hi = starts[r], starts[r + 1]
        assert got["first_expert"] == r * local
        assert torch.equal(got["loads"], chosen)  # loads summed over ranks: every rank updates alike
        worst = max(worst, _max_abs_diff(got["y"], y_all[:, lo:hi].detach()))
        worst = max(worst, _max_abs_diff(got["x_grad"], x_all.grad[:, lo:hi]))
        for name, grad in got["grads"].items():
            full = dict(layer.named_parameters())[name].grad
            if name.startswith("experts."):  # complete on the owner: its slice of the full gradient
                worst = max(worst, _max_abs_diff(grad, full[r * local : (r + 1) * local]))
            else:  # replicated: per-rank partial sums that data parallelism adds up
                replicated[name] = replicated.get(name, 0) + grad
    for name, total in replicated.items():
        worst = max(worst, _max_abs_diff(total, dict(layer.named_parameters())[name].grad))
    return worst, chosen.view(world, local).sum(1)


def test_two_ranks_uneven_tokens(tmp_path: Path) -> None:
    worst, rows_per_rank = _run_ranks(tmp_path, 2, tokens_per_rank=[13, 4], silenced=[1, 2, 9])
    assert worst <= TOLERANCE  # outputs and every gradient equal the single-process layer's
    assert (rows_per_rank > 0).all()  # both ranks computed rows from both ranks' tokens


@pytest.mark.parametrize("tokens_per_rank", [[9, 1, 17, 5], [6, 0, 11, 3]])
def test_four_ranks_one_rank_gets_no_row(tmp_path: Path, tokens_per_rank: list[int]) -> None:
    # Experts 4..7 are rank 1's: silenced, rank 1 computes nothing but still takes part in every exchange.
    worst, rows_per_rank = _run_ranks(tmp_path, 4, tokens_per_rank=tokens_per_rank, silenced=[4, 5, 6, 7, 12])
    assert worst <= TOLERANCE
    assert rows_per_rank[1] == 0 and (rows_per_rank[[0, 2, 3]] > 0).all()


def test_two_ranks_fp8_experts_on_the_triton_kernels(tmp_path: Path) -> None:
    """FP8 routed experts (forward and backward) through the all-to-all: the same rows reach each expert
    in the same order, so every quantization tile, and the result, equals the single-process layer's.
    The ranks run the Triton kernels in the interpreter; this process runs the torch steps."""
    interpret = {"TRITON_INTERPRET": "1", "DSV3_KERNELS": "triton"}
    worst, rows_per_rank = _run_ranks(tmp_path, 2, [13, 4], silenced=[1, 2, 9], fp8=True, env=interpret)
    assert worst <= 1e-4  # interpreter kernels vs torch steps: fp32 sums in another order
    assert (rows_per_rank > 0).all()
