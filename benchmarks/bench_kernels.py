"""GPU benchmark of dsv3's FP8 GEMM and MoE expert kernels against torch.

Dense block-scaled FP8 GEMM (1x128 activation tiles, 128x128 weight blocks) at 4096^3, 8192^3 and
DeepSeek-V3 shapes (M = 4096, 128, 64 with (N, K) = (4096, 7168) and (7168, 2048)): bf16 `torch.matmul`,
torch's blockwise scaled_mm (cuBLAS) and our Triton kernel, each FP8 one with activation quantization
excluded (weights and activations quantized beforehand) and included (activation quantized in the timed
region, weights pre-quantized as in inference), and `ops.fp8_gemm`'s own per-shape choice.

MoE expert layer (64 experts, top-6, hidden 2048, width 1408; 4k and 16k tokens), routing permutation and
combine inside the timed region: a PyTorch loop over experts, `torch._grouped_mm` bf16, ours bf16, ours FP8.

Timing: triton.testing.do_bench (median of CUDA-event timed runs, L2 flushed). Prints one table and writes
JSON. Needs a CUDA GPU; exits with status 2 and a message without one.

    python benchmarks/bench_kernels.py [--out benchmarks/out/bench_kernels.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
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


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dense_rows(quick: bool) -> list[dict]:
    from dsv3.kernels import fp8, gemm, ops, reference, scaled_mm

    rows = []
    for m, n, k in DENSE_SHAPES[:2] if quick else DENSE_SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        a, a_s = fp8.act_quant(x)
        b, b_s = fp8.weight_quant(w)
        exact = reference.fp8_gemm(a, a_s, b, b_s, torch.float32)
        impls: dict[str, Callable[[], torch.Tensor]] = {
            "bf16 torch.matmul": lambda x=x, w=w: x @ w.T,
            "fp8 ours (Triton)": lambda a=a, a_s=a_s, b=b, b_s=b_s: gemm.fp8_gemm(a, a_s, b, b_s),
            "fp8 ours + act quant": lambda x=x, b=b, b_s=b_s: gemm.fp8_gemm(*fp8.act_quant(x), b, b_s),
            "fp8 ops.fp8_gemm + act quant": lambda x=x, b=b, b_s=b_s: ops.fp8_gemm(*ops.act_quant(x), b, b_s),
        }
        try:
            scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s)
            impls["fp8 torch scaled_mm (cuBLAS)"] = lambda a=a, a_s=a_s, b=b, b_s=b_s: (
                scaled_mm.blockwise_scaled_mm(a, a_s, b, b_s)
            )
            impls["fp8 torch scaled_mm + act quant"] = lambda x=x, b=b, b_s=b_s: (
                scaled_mm.blockwise_scaled_mm(*fp8.act_quant(x), b, b_s)
            )
        except (RuntimeError, TypeError) as err:
            print(f"  torch blockwise scaled_mm unavailable for {(m, n, k)}: {str(err).splitlines()[0]}")
        flops = 2 * m * n * k
        base_ms = None
        for name, fn in impls.items():
            ms = _bench(fn)
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


def _routing(tokens: int):
    from dsv3.model.dispatch import Routing

    scores = torch.rand(tokens, MOE["experts"], device="cuda")
    weights, ids = scores.topk(MOE["top_k"], dim=-1)
    return Routing(ids, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16), scores)


def _torch_grouped_mm(x, ids, weights, w_gate_up, w_down) -> torch.Tensor:
    """The MoE layer on torch._grouped_mm: sort, gather, two grouped GEMMs, index_add combine."""
    top_k = ids.shape[1]
    order = torch.argsort(ids.reshape(-1), stable=True)
    offsets = torch.cumsum(torch.bincount(ids.reshape(-1), minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    rows = x.index_select(0, order // top_k)
    gate, up = torch._grouped_mm(rows, w_gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    hidden = F.silu(gate) * up * weights.reshape(-1)[order, None]
    out = torch._grouped_mm(hidden, w_down.transpose(-2, -1), offs=offsets)
    return torch.zeros_like(x).index_add_(0, order // top_k, out)


def _moe_case(tokens: int, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> list[dict]:
    """The whole routed-expert layer: the model's dispatcher around each grouped compute."""
    from dsv3.kernels import fp8, moe, reference
    from dsv3.model.dispatch import LocalDispatcher

    e, d, f = MOE["experts"], MOE["hidden"], MOE["width"]
    wgu_q, wgu_s = fp8.weight_quant(w_gate_up)
    wd_q, wd_s = fp8.weight_quant(w_down)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    routing = _routing(tokens)
    dispatcher = LocalDispatcher(e)

    def layer(compute: Callable[..., torch.Tensor], x=x) -> torch.Tensor:
        rows, counts, handle = dispatcher.dispatch(x, routing)
        return dispatcher.combine(compute(rows, counts, handle.row_weights_N), handle)

    def offsets(counts: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(counts, 0).to(torch.int32)

    impls: dict[str, Callable[[], torch.Tensor]] = {
        # on CUDA the reference takes its per-expert loop (its torch._grouped_mm path is CPU-only)
        "bf16 PyTorch loop over experts": lambda: layer(
            lambda r, c, w: reference.grouped_swiglu(r, c, w_gate_up, w_down, w)
        ),
        "bf16 ours (Triton)": lambda: layer(
            lambda r, c, w: moe.grouped_swiglu(r, offsets(c), w_gate_up, w_down, w.float())
        ),
        "fp8 ours (Triton)": lambda: layer(
            lambda r, c, w: moe.grouped_swiglu_fp8(r, offsets(c), wgu_q, wgu_s, wd_q, wd_s, w.float())
        ),
    }
    if hasattr(torch, "_grouped_mm"):
        impls["bf16 torch._grouped_mm"] = lambda: _torch_grouped_mm(
            x, routing.ids_TK, routing.weights_TK, w_gate_up, w_down
        )
    exact = layer(
        lambda r, c, w: reference.grouped_swiglu(r, c.cpu(), w_gate_up.float(), w_down.float(), w),
        x=x.float(),
    )
    flops = 6 * tokens * MOE["top_k"] * d * f
    rows, base_ms = [], None
    for name, fn in impls.items():
        ms = _bench(fn)
        base_ms = base_ms or ms
        rows.append(
            {
                "case": f"moe E={e} top{MOE['top_k']} D={d} F={f} T={tokens}",
                "impl": name,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "vs_first": base_ms / ms,
                "rel_err": _rel_err(fn(), exact),
            }
        )
    return rows


def _moe_rows(quick: bool) -> list[dict]:
    e, d, f = MOE["experts"], MOE["hidden"], MOE["width"]
    w_gate_up = torch.randn(e, 2 * f, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    w_down = torch.randn(e, d, f, device="cuda", dtype=torch.bfloat16) / f**0.5
    rows = []
    for tokens in MOE["tokens"][:1] if quick else MOE["tokens"]:
        rows += _moe_case(tokens, w_gate_up, w_down)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_kernels.json"))
    parser.add_argument("--quick", action="store_true", help="two GEMM shapes and 4k-token MoE only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU and none is available; nothing was measured.", file=sys.stderr)
        sys.exit(2)
    try:
        import triton
    except ImportError:
        print("bench_kernels: needs triton (pip install -e '.[kernels]').", file=sys.stderr)
        sys.exit(2)

    torch.manual_seed(0)
    rows = _dense_rows(args.quick) + _moe_rows(args.quick)
    header = f"{'case':<40} {'implementation':<32} {'ms':>9} {'TFLOP/s':>8} {'x first':>8} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    last_case = None
    for row in rows:
        case = row["case"] if row["case"] != last_case else ""
        last_case = row["case"]
        print(
            f"{case:<40} {row['impl']:<32} {row['ms']:>9.3f} {row['tflops']:>8.1f} "
            f"{row['vs_first']:>8.2f} {row['rel_err']:>9.2e}"
        )
    report = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "notes": "x first = speed relative to the first implementation of each case (bf16 matmul / PyTorch "
        "loop); rel err vs fp32 of the dequantized operands (fp8) or of the bf16 inputs (bf16).",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
