"""Fused float32 CPU training kernels (`cpu_fused.c`): RMSNorm, SwiGLU and MLA's per-head q, k, v
assembly, forward and backward.

Why: on the CPU the trainer's step is dominated, after the GEMMs, by memory-bound elementwise chains:
RMSNorm is 4 torch ops forward and 6 backward, the weighted SwiGLU 3 and 8, MLA's rope, concatenations
and V padding about 20, each a full pass over the activations. Each kernel here makes one pass.
Measured on the 2-core Xeon box: benchmarks/RESULTS.md, "Trainer speed, fifth pass".

The C source is compiled once per machine with the system C compiler (`$CC`, else `cc`) into a cache
directory (`$DSV3_KERNEL_CACHE`, else `$XDG_CACHE_HOME/dsv3` or `~/.cache/dsv3`), under a name that
hashes the source, the compiler and the CPU, and loaded through ctypes (which releases the GIL for the
call, so concurrent training passes overlap in these kernels). Without a compiler, or with
`DSV3_CPU_KERNELS=0`, `available()` is False and `dsv3.kernels.ops` keeps the torch paths.

The kernels are single-threaded and deterministic (fixed summation order), used where the trainer runs
one torch thread per pass (`dsv3.trainer.passes`) or one thread in all.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from dsv3.kernels.reference import inverse_permutation

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_fused.c")
ENABLE_ENV = "DSV3_CPU_KERNELS"
CACHE_ENV = "DSV3_KERNEL_CACHE"
# libmvec's vector expf first; a C library without it still gets the kernels, with scalar expf.
_FLAG_SETS = (  # (defines, libraries)
    (("-DDSV3_VECTOR_EXPF",), ("-lmvec",)),
    ((), ()),
)
_BASE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", "-std=c11")

_ptr = ctypes.c_void_p
_long = ctypes.c_long
_SIGNATURES = {
    "dsv3_rms_norm_forward": (_ptr, _long, _long, _long, _ptr, ctypes.c_float, _ptr, _ptr),
    "dsv3_rms_norm_backward": (_ptr, _long, _ptr, _long, _long, _long, _ptr, _ptr, _ptr, _ptr),
    "dsv3_swiglu_forward": (_ptr, _ptr, _long, _long, _long, _ptr, _ptr),
    "dsv3_swiglu_backward": (_ptr, _ptr, _ptr, _long, _long, _long, _ptr, _ptr, _ptr, _long, _ptr),
    "dsv3_mla_heads_forward": (
        _ptr,
        _long,
        _ptr,
        _long,
        _ptr,
        _long,
        _ptr,
        _ptr,
        *(_long,) * 6,
        _ptr,
        _ptr,
        _ptr,
    ),
    "dsv3_mla_heads_backward": (_ptr, _ptr, _ptr, _ptr, _ptr, *(_long,) * 6, _ptr, _ptr, _ptr),
    "dsv3_gather_rows": (_ptr, _long, _ptr, _long, _long, _long, _ptr),
    "dsv3_sum_rows": (_ptr, _ptr, _long, _long, _long, _ptr),
}


def enabled() -> bool:
    """False when `DSV3_CPU_KERNELS` is 0/false/no/off."""
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the fused kernels are enabled and built (building them on first call)."""
    return enabled() and _library() is not None


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsv3"


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model name and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))


def _compile(compiler: str, target: Path) -> bool:
    """Build the library at `target` (atomically: concurrent builders each write their own file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for defines, libraries in _FLAG_SETS:
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        command = [compiler, *_BASE_FLAGS, *defines, "-o", str(partial), str(SOURCE), "-lm", *libraries]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            os.replace(partial, target)
            return True
        partial.unlink(missing_ok=True)
        log.debug("cpu_fused: %s failed: %s", " ".join(command), result.stderr.strip())
    return False


_BUILD_LOCK = threading.Lock()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded library, built on first use. Pass threads that race to the first call take the lock in
    turn: the first builds, the next finds the file. Later calls hit the cache, without the lock."""
    with _BUILD_LOCK:
        return _load()


def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("cpu_fused: no C compiler (cc or $CC); using the torch ops")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), compiler, version, _cpu_identity()))
    ).hexdigest()[:16]
    name = f"cpu_fused-{key}.so"
    # a read-only home (a container's) falls back to the temporary directory
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"dsv3-{os.getuid()}"):
        target = directory / name
        try:
            if not target.exists() and not _compile(compiler, target):
                log.warning("cpu_fused: %s could not build %s; using the torch ops", compiler, SOURCE.name)
                return None
            library = ctypes.CDLL(str(target))
            break
        except OSError as error:
            log.warning("cpu_fused: cannot build or load %s (%s)", target, error)
    else:
        log.warning("cpu_fused: no usable cache directory; using the torch ops")
        return None
    for function_name, argtypes in _SIGNATURES.items():
        function = getattr(library, function_name)
        function.argtypes = argtypes
        function.restype = None
    return library


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as [rows, last] with unit stride along the last dim (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        rows = _rows(x)
        weight = weight.contiguous()
        out = torch.empty(rows.shape, dtype=x.dtype)
        r = torch.empty(rows.shape[0], dtype=x.dtype)
        _library().dsv3_rms_norm_forward(
            rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0), weight.data_ptr(), eps,
            out.data_ptr(), r.data_ptr(),
        )  # fmt: skip
        ctx.save_for_backward(rows, weight, r)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        rows, weight, r = ctx.saved_tensors
        grad_rows = _rows(grad)
        grad_x = torch.empty(rows.shape, dtype=rows.dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(rows.shape[1], dtype=rows.dtype) if ctx.needs_input_grad[1] else None
        _library().dsv3_rms_norm_backward(
            grad_rows.data_ptr(), grad_rows.stride(0), rows.data_ptr(), rows.stride(0), rows.shape[0],
            rows.shape[1], weight.data_ptr(), r.data_ptr(), _address(grad_x), _address(grad_w),
        )  # fmt: skip
        return (None if grad_x is None else grad_x.view(ctx.shape)), grad_w, None


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    rows, width = gate.shape
    out = torch.empty(rows, width, dtype=gate.dtype)
    _library().dsv3_swiglu_forward(
        gate.data_ptr(), up.data_ptr(), gate.stride(0), rows, width, _address(row_weights), out.data_ptr()
    )
    return out


def _swiglu_backward(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    row_weights: torch.Tensor | None,
    grad_gate: torch.Tensor,
    grad_up: torch.Tensor,
    grad_weights: torch.Tensor | None,
) -> None:
    grad = grad.contiguous()
    rows, width = gate.shape
    _library().dsv3_swiglu_backward(
        grad.data_ptr(), gate.data_ptr(), up.data_ptr(), gate.stride(0), rows, width,
        _address(row_weights), grad_gate.data_ptr(), grad_up.data_ptr(), grad_gate.stride(0),
        _address(grad_weights),
    )  # fmt: skip


class _WeightedSwiGLU(torch.autograd.Function):
    """h = w_row * silu(gate) * up on gate_up [N, 2F] = [gate | up]; d gate_up comes back as one
    contiguous [N, 2F] tensor, which the grouped GEMM's backward takes as it is."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        gate, up = gate_up.chunk(2, dim=1)
        ctx.save_for_backward(gate_up, row_weights)
        return _swiglu_forward(gate, up, row_weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        gate_up, row_weights = ctx.saved_tensors
        grad_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype)
        wants_weights = row_weights is not None and ctx.needs_input_grad[1]
        grad_weights = torch.empty(gate_up.shape[0], dtype=gate_up.dtype) if wants_weights else None
        _swiglu_backward(
            grad, *gate_up.chunk(2, dim=1), row_weights, *grad_gate_up.chunk(2, dim=1), grad_weights
        )
        return grad_gate_up, grad_weights


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up on two contiguous [rows, F] tensors."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _swiglu_backward(grad, gate, up, None, grad_gate, grad_up, None)
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of float32 CPU `x` with float32 `weight` (differentiable)."""
    return _FusedRMSNorm.apply(x, weight, eps)


def weighted_swiglu(gate_up: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """w_row * silu(gate) * up for float32 CPU `gate_up` [N, 2F] = [gate | up] and `row_weights` [N]."""
    if gate_up.stride(1) != 1 or gate_up.stride(0) != gate_up.shape[1]:
        gate_up = gate_up.contiguous()
    weights = None if row_weights is None else row_weights.to(gate_up.dtype).contiguous()
    return _WeightedSwiGLU.apply(gate_up, weights)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for float32 CPU tensors of one shape [..., F] (differentiable)."""
    shape = gate.shape
    gate_rows = gate.reshape(-1, shape[-1]).contiguous()
    up_rows = up.reshape(-1, shape[-1]).contiguous()
    return _SiluMul.apply(gate_rows, up_rows).view(shape)


class MLAHeads(torch.autograd.Function):
    """MLA's per-head q, k, v [B, H, T, Q] from the projections, in one pass: `ops.mla_heads` (which
    documents and validates the arguments) applies it. Replaces a split, two rotations, two
    concatenations, an expand, a pad and their backward ops."""

    @staticmethod
    def forward(ctx, q, kv, rope_key, cos, sin, heads: int, nope: int, vdim: int):  # type: ignore[override]
        batch, tokens, _ = q.shape
        width = q.shape[-1] // heads
        rope = width - nope
        q, kv, rope_key = (_rows(t) for t in (q, kv, rope_key))
        cos, sin = cos.contiguous(), sin.contiguous()
        q_out, k_out, v_out = (torch.empty(batch, heads, tokens, width, dtype=q.dtype) for _ in range(3))
        _library().dsv3_mla_heads_forward(
            q.data_ptr(), q.stride(0), kv.data_ptr(), kv.stride(0), rope_key.data_ptr(), rope_key.stride(0),
            cos.data_ptr(), sin.data_ptr(), batch, tokens, heads, nope, rope, vdim,
            q_out.data_ptr(), k_out.data_ptr(), v_out.data_ptr(),
        )  # fmt: skip
        ctx.save_for_backward(cos, sin)
        ctx.dims = (batch, tokens, heads, nope, rope, vdim)
        return q_out, k_out, v_out

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        batch, tokens, heads, nope, rope, vdim = ctx.dims
        grads = [grad_q, grad_k, grad_v]
        if any(g is None for g in grads):  # an output autograd had no gradient for: its gradient is zero
            zeros = torch.zeros(batch, heads, tokens, nope + rope, dtype=cos.dtype)
            grads = [zeros if g is None else g for g in grads]
        grad_q, grad_k, grad_v = (g.contiguous() for g in grads)
        dq = torch.empty(batch, tokens, heads * (nope + rope), dtype=cos.dtype)
        dkv = torch.empty(batch, tokens, heads * (nope + vdim), dtype=cos.dtype)
        drope_key = torch.empty(batch, tokens, rope, dtype=cos.dtype)
        _library().dsv3_mla_heads_backward(
            grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            batch, tokens, heads, nope, rope, vdim, dq.data_ptr(), dkv.data_ptr(), drope_key.data_ptr(),
        )  # fmt: skip
        return dq, dkv, drope_key, None, None, None, None, None


def _gather(src: torch.Tensor, index: torch.Tensor, divisor: int) -> torch.Tensor:
    out = torch.empty(index.shape[0], src.shape[1], dtype=src.dtype)
    _library().dsv3_gather_rows(
        src.data_ptr(), src.stride(0), index.data_ptr(), divisor, index.shape[0], src.shape[1], out.data_ptr()
    )
    return out


def _sum(src: torch.Tensor, inverse: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    out = torch.empty(tokens, src.shape[1], dtype=src.dtype)
    _library().dsv3_sum_rows(src.data_ptr(), inverse.data_ptr(), tokens, top_k, src.shape[1], out.data_ptr())
    return out


class _PermuteRows(torch.autograd.Function):
    """rows[i] = x[order[i] // K]; the backward sums each token's K row gradients (choice order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(order)
        ctx.top_k, ctx.tokens = top_k, x.shape[0]
        return _gather(_rows(x), order, top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (order,) = ctx.saved_tensors
        return _sum(grad.contiguous(), inverse_permutation(order), ctx.tokens, ctx.top_k), None, None


class _UnpermuteSum(torch.autograd.Function):
    """y[t] = sum of token t's K rows (choice order); the backward hands each row its token's gradient."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return _sum(rows.contiguous(), inverse_permutation(order), tokens, top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (order,) = ctx.saved_tensors
        return _gather(_rows(grad), order, ctx.top_k), None, None, None


def permute_rows(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_TD[order_N // top_k] for float32 CPU `x_TD` [T, D] and int64 `order_N` (differentiable)."""
    return _PermuteRows.apply(x_TD, order_N.contiguous(), top_k)


def unpermute_sum(rows_ND: torch.Tensor, order_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y[t] = the sum of token t's rows (row i is token order_N[i] // top_k's): float32 CPU."""
    return _UnpermuteSum.apply(rows_ND, order_N.contiguous(), num_tokens, top_k)
