"""Which implementation an op of `dsv3.kernels.ops` runs: the requested backend (`DSV3_KERNELS` or
`force_backend`), whether Triton can run, and whether the fused CPU training kernels apply."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

from dsv3.kernels import cpu_fused

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "DSV3_KERNELS"
_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsv3_kernels", default=None)


def backend() -> str:
    """The requested backend: `force_backend(...)` if active, else $DSV3_KERNELS, else "auto"."""
    name = _forced_backend.get() or os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on `name` ("auto", "triton" or "torch")."""
    if name not in BACKENDS:
        raise ValueError(f"force_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    choice = backend()
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "torch":
        return False
    if choice == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"{op}: the triton backend was forced but triton is not importable")
    if not on_cuda and not interpreter_requested():
        raise RuntimeError(
            f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported"
        )
    return True


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_cpu_training(*tensors: torch.Tensor) -> bool:
    """Whether autograd needs these float32 CPU tensors' gradients and the fused CPU training kernels
    (`cpu_fused`) are on: where the model calls `cpu_fused` kernels that have no other backend."""
    return needs_grad(*tensors) and use_cpu_fused(*tensors)


def use_cpu_fused(*tensors: torch.Tensor) -> bool:
    """The fused CPU training kernels (`cpu_fused`): float32 CPU tensors, the "auto" backend."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and backend() == "auto"
        and cpu_fused.available()
    )
