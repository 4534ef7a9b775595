"""GPU benchmark of dsv3's FP8 GEMM and MoE expert kernels against torch.

Dense block-scaled FP8 GEMM (1x128 activation tiles, 128x128 weight blocks) at 4096^3, 8192^3 and
DeepSeek-V3 shapes (M = 4096, 128, 64 with (N, K) = (4096, 7168) and (7168, 2048)): bf16 `torch.matmul`,
torch's blockwise scaled_mm (cuBLAS) and our Triton kernel, each FP8 one with activation quantization
excluded (weights and activations quantized beforehand) and included (activation quantized in the timed
region, weights pre-quantized as in inference), and `ops.fp8_gemm`'s own per-shape choice.

MoE expert layer (64 experts, top-6, hidden 2048, width 1408; 4k and 16k tokens), routing permutation and
combine inside the timed region, forward and forward+backward: `torch._grouped_mm` bf16 (the baseline),
ours bf16, ours FP8 (inference kernels with pre-quantized weights; the training path
`ops.grouped_swiglu_fp8_training`, which quantizes the master weights every call, fuses the permutation
into the rows' quantization and runs dgrad and wgrad in FP8). Dense rows add `ops.fp8_linear` (activation
quantization inside the GEMM for M <= 128).

Timing: triton.testing.do_bench (median of CUDA-event timed runs, L2 flushed), contenders alternated,
best of `--repeats`. Prints one table and writes JSON. Needs a CUDA GPU (exits with status 2 without one),
except `--dry-run`: tiny shapes on the CPU under the Triton interpreter, to check the script runs.

    python benchmarks/bench_kernels.py [--out benchmarks/out/bench_kernels.json] [--quick] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

DENSE_SHAPES = [  # (M, N, K)
    (4096, 4096, 4096),
    (8192, 8192, 8192),
    (4096, 4096, 7168),
    (4096, 7168, 2048),
    (128, 4096, 7168),
    (128, 7168, 2048),
    (64, 4096, 7168),
    (64, 7168, 2048),
]
MOE = {"experts": 64, "top_k": 6, "hidden": 2048, "width": 1408, "tokens": [4096, 16384]}
DRY_DENSE = [(16, 256, 256)]  # --dry-run: every contender once on the CPU
DRY_MOE = {"experts": 4, "top_k": 2, "hidden": 128, "width": 64, "tokens": [40]}


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dense_rows(shapes: list[tuple[int, int, int]], device: str, bench) -> list[dict]:
    from dsv3.kernels import fp8, gemm, ops, reference, scaled_mm

    rows = []
    for m, n, k in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
        a, a_s = fp8.act_quant(x)
        b, b_s = fp8.weight_quant(w)
        exact = reference.fp8_gemm(a, a_s, b, b_s, torch.float32)
        impls: dict[str, Callable[[], torch.Tensor]] = {
            "bf16 torch.matmul": lambda x=x, w=w: x @ w.T,
            "fp8 ours (Triton)": lambda a=a, a_s=a_s, b=b, b_s=b_s: gemm.fp8_gemm(a, a_s, b, b_s),
            "fp8 ours + act quant": lambda x=x, b=b, b_s=b_s: gemm.fp8_gemm(*fp8.act_quant(x), b, b_s),
            "fp8 ops.fp8_gemm + act quant": lambda x=x, b=b, b_s=b_s: ops.fp8_gemm(*ops.act_quant(x), b, b_s),
            "fp8 ops.fp8_linear (fused act quant)": lambda x=x, b=b, b_s=b_s: ops.fp8_linear(x, b, b_s),
        }
        try:
            scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s)
            impls["fp8 torch scaled_mm (cuBLAS)"] = lambda a=a, a_s=a_s, b=b, b_s=b_s: (
                scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s)
            )
            impls["fp8 torch scaled_mm + act quant"] = lambda x=x, b=b, b_s=b_s: (
                scaled_mm.blockwise_scaled_mm(*fp8.act_quant(x), b, b_s)
            )
        except Exception as err:  # any refusal (shape, device, torch build) skips the rows
            print(f"  torch blockwise scaled_mm unavailable for {(m, n, k)}: {str(err).splitlines()[0]}")
        flops = 2 * m * n * k
        base_ms = None
        timed = bench(impls)
        for name, fn in impls.items():
            ms = timed[name]
            base_ms = base_ms or ms
            err = _rel_err(fn(), exact) if name.startswith("fp8") else _rel_err(fn(), x.float() @ w.float().T)
            rows.append(
                {
                    "case": f"gemm M={m} N={n} K={k}",
                    "impl": name,
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                    "vs_first": base_ms / ms,
                    "rel_err": err,
                }
            )
    return rows


def _routing(tokens: int, moe: dict, device: str):
    from dsv3.model.dispatch import Routing

    scores = torch.rand(tokens, moe["experts"], device=device)
    weights, ids = scores.topk(moe["top_k"], dim=-1)
    return Routing(ids, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16), scores)


def _torch_grouped_mm(x, ids, weights, w_gate_up, w_down) -> torch.Tensor:
    """The MoE layer on torch._grouped_mm: sort, gather, two grouped GEMMs, index_add combine."""
    top_k = ids.shape[1]
    order = torch.argsort(ids.reshape(-1), stable=True)
    offsets = torch.cumsum(torch.bincount(ids.reshape(-1), minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    rows = x.index_select(0, order // top_k)
    gate, up = torch._grouped_mm(rows, w_gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    hidden = F.silu(gate) * up * weights.reshape(-1)[order, None].to(gate.dtype)
    out = torch._grouped_mm(hidden, w_down.transpose(-2, -1), offs=offsets)
    return torch.zeros_like(x).index_add_(0, order // top_k, out)


def _with_backward(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor):
    """forward + backward of the layer (gradients to x, the expert weights and the combine weights)."""

    def step() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.backward(grad)
        return out

    return step


def _moe_case(tokens: int, w_gate_up: torch.Tensor, w_down: torch.Tensor, moe: dict, bench) -> list[dict]:
    """The whole routed-expert layer, routing permutation and combine included, forward and fwd+bwd."""
    from dsv3.kernels import fp8, ops, reference
    from dsv3.kernels import moe as moe_kernels
    from dsv3.model.dispatch import LocalDispatcher, sort_by_expert, unpermute_sum

    e, d, f, top_k = moe["experts"], moe["hidden"], moe["width"], moe["top_k"]
    device = w_gate_up.device
    wgu_q, wgu_s = fp8.weight_quant(w_gate_up)
    wd_q, wd_s = fp8.weight_quant(w_down)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    routing = _routing(tokens, moe, device)
    dispatcher = LocalDispatcher(e)

    def layer(compute: Callable[..., torch.Tensor], x=x) -> torch.Tensor:
        rows, counts, handle = dispatcher.dispatch(x, routing)
        return dispatcher.combine(compute(rows, counts, handle.row_weights_N), handle)

    def offsets(counts: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(counts, 0).to(torch.int32)

    def fp8_training_layer(x, w_gate_up, w_down, weights_TK) -> torch.Tensor:
        """FP8 experts with the permutation fused into the rows' quantization (rows_N)."""
        order, counts = sort_by_expert(routing.ids_TK, e)
        row_weights = weights_TK.reshape(-1).index_select(0, order)
        out = ops.grouped_swiglu_fp8_training(
            x, counts, w_gate_up, w_down, row_weights, rows_N=torch.div(order, top_k, rounding_mode="floor")
        )
        return unpermute_sum(out, order, tokens, top_k)

    forward: dict[str, Callable[[], torch.Tensor]] = {
        "bf16 torch._grouped_mm": lambda: _torch_grouped_mm(
            x, routing.ids_TK, routing.weights_TK, w_gate_up, w_down
        ),
        "bf16 ours (Triton)": lambda: layer(
            lambda r, c, w: moe_kernels.grouped_swiglu(r, offsets(c), w_gate_up, w_down, w.float())
        ),
        "fp8 ours, weights pre-quantized": lambda: layer(
            lambda r, c, w: moe_kernels.grouped_swiglu_fp8(r, offsets(c), wgu_q, wgu_s, wd_q, wd_s, w.float())
        ),
        "fp8 ours training (quantizes weights)": lambda: fp8_training_layer(
            x, w_gate_up, w_down, routing.weights_TK
        ),
    }
    x_leaf = x.clone().requires_grad_(True)
    wgu_leaf, wd_leaf = w_gate_up.clone().requires_grad_(True), w_down.clone().requires_grad_(True)
    weights_leaf = routing.weights_TK.clone().requires_grad_(True)
    leaves = [x_leaf, wgu_leaf, wd_leaf, weights_leaf]
    grad = torch.randn_like(x)
    both: dict[str, Callable[[], torch.Tensor]] = {
        "bf16 torch._grouped_mm": _with_backward(
            lambda: _torch_grouped_mm(x_leaf, routing.ids_TK, weights_leaf, wgu_leaf, wd_leaf), leaves, grad
        ),
        # our bf16 Triton path has no backward: with gradients ops.grouped_swiglu takes the reference
        "bf16 ours (ops.grouped_swiglu: reference backward)": _with_backward(
            lambda: _layer_with(dispatcher, x_leaf, routing, weights_leaf, wgu_leaf, wd_leaf), leaves, grad
        ),
        "fp8 ours (FP8 fwd + dgrad + wgrad)": _with_backward(
            lambda: fp8_training_layer(x_leaf, wgu_leaf, wd_leaf, weights_leaf), leaves, grad
        ),
    }
    exact = layer(
        lambda r, c, w: reference.grouped_swiglu(r, c.cpu(), w_gate_up.float(), w_down.float(), w),
        x=x.float(),
    )
    flops = 6 * tokens * top_k * d * f
    case = f"moe E={e} top{top_k} D={d} F={f} T={tokens}"
    rows = []
    for mode, impls, mode_flops in (("fwd", forward, flops), ("fwd+bwd", both, 3 * flops)):
        base_ms = None
        timed = bench(impls)
        for name, fn in impls.items():
            ms = timed[name]
            base_ms = base_ms or ms
            rows.append(
                {
                    "case": f"{case} {mode}",
                    "impl": name,
                    "ms": ms,
                    "tflops": mode_flops / ms / 1e9,
                    "vs_first": base_ms / ms,
                    "rel_err": _rel_err(fn().detach(), exact),
                }
            )
    return rows


def _layer_with(dispatcher, x, routing, weights_TK, w_gate_up, w_down) -> torch.Tensor:
    from dataclasses import replace

    from dsv3.kernels import ops

    rows, counts, handle = dispatcher.dispatch(x, replace(routing, weights_TK=weights_TK))
    return dispatcher.combine(
        ops.grouped_swiglu(rows, counts, w_gate_up, w_down, handle.row_weights_N), handle
    )


def _moe_rows(quick: bool, moe: dict, device: str, bench) -> list[dict]:
    e, d, f = moe["experts"], moe["hidden"], moe["width"]
    w_gate_up = torch.randn(e, 2 * f, d, device=device, dtype=torch.bfloat16) / d**0.5
    w_down = torch.randn(e, d, f, device=device, dtype=torch.bfloat16) / f**0.5
    rows = []
    for tokens in moe["tokens"][:1] if quick else moe["tokens"]:
        rows += _moe_case(tokens, w_gate_up, w_down, moe, bench)
    return rows


def _interleaved(repeats: int, timer: Callable[[Callable[[], object]], float]):
    """Time each contender `repeats` times, alternating between them; keep each one's best."""

    def bench(impls: dict[str, Callable[[], object]]) -> dict[str, float]:
        best = {name: float("inf") for name in impls}
        for _ in range(repeats):
            for name, fn in impls.items():
                best[name] = min(best[name], timer(fn))
        return best

    return bench


def _wall_ms(fn: Callable[[], object]) -> float:
    import time

    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_kernels.json"))
    parser.add_argument("--quick", action="store_true", help="two GEMM shapes and 4k-token MoE only")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating timings per contender (best kept)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny shapes, Triton interpreter: checks every contender runs; the times mean nothing",
    )
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        from dsv3.kernels import ops

        with ops.force_backend("triton"):
            rows = _dense_rows(DRY_DENSE, "cpu", _interleaved(1, _wall_ms))
            rows += _moe_rows(False, DRY_MOE, "cpu", _interleaved(1, _wall_ms))
        _report(rows, {"device": "cpu (dry run: interpreter, times meaningless)"}, args.out)
        return
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU and none is available; nothing was measured.", file=sys.stderr)
        sys.exit(2)
    try:
        import triton
    except ImportError:
        print("bench_kernels: needs triton (pip install -e '.[kernels]').", file=sys.stderr)
        sys.exit(2)

    torch.manual_seed(0)
    bench = _interleaved(args.repeats, _bench)
    rows = _dense_rows(DENSE_SHAPES[:2] if args.quick else DENSE_SHAPES, "cuda", bench)
    rows += _moe_rows(args.quick, MOE, "cuda", bench)
    meta = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    _report(rows, meta, args.out)


def _report(rows: list[dict], meta: dict, out: Path) -> None:
    header = f"{'case':<44} {'implementation':<50} {'ms':>9} {'TFLOP/s':>8} {'x first':>8} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    last_case = None
    for row in rows:
        case = row["case"] if row["case"] != last_case else ""
        last_case = row["case"]
        print(
            f"{case:<44} {row['impl']:<50} {row['ms']:>9.3f} {row['tflops']:>8.1f} "
            f"{row['vs_first']:>8.2f} {row['rel_err']:>9.2e}"
        )
    report = {
        **meta,
        "notes": "x first = speed relative to the first implementation of each case (bf16 matmul / "
        "torch._grouped_mm); rel err vs fp32 of the dequantized operands (dense fp8) or of the bf16 inputs; "
        "MoE fwd+bwd rel err is the forward output's.",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
