"""Input validation for `dsv3.kernels.ops`: every check raises `KernelInputError` naming the op and the
argument, so a bad call fails with a message rather than inside a kernel."""

from __future__ import annotations

import torch


class KernelInputError(ValueError):
    """An op was called with tensors of the wrong shape, dtype or device."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    dim: int | None = None,
    min_dim: int | None = None,
    contiguous: bool = True,
) -> None:
    check(isinstance(t, torch.Tensor), f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    if dtypes is not None:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        check(t.dtype in dtypes, f"{op}: {name} must be {names}, got {str(t.dtype).removeprefix('torch.')}")
    if dim is not None:
        check(t.dim() == dim, f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None:
        check(t.dim() >= min_dim, f"{op}: {name} must have at least {min_dim} dims, got {tuple(t.shape)}")
    if contiguous:
        check(t.is_contiguous(), f"{op}: {name} must be contiguous (call .contiguous())")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) == 1, f"{op}: tensors on different devices: {devices}")


def check_block(op: str, block_size: int, scale_fmt: str | None = None) -> None:
    check(
        isinstance(block_size, int) and 16 <= block_size <= 1024 and block_size & (block_size - 1) == 0,
        f"{op}: block_size must be a power of two in [16, 1024], got {block_size!r}",
    )
    check(scale_fmt in (None, "ue8m0"), f"{op}: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def check_scale(op: str, name: str, s: torch.Tensor, shape: tuple[int, ...]) -> None:
    check_tensor(op, name, s, dtypes=(torch.float32,))
    check(tuple(s.shape) == shape, f"{op}: {name} must have shape {shape}, got {tuple(s.shape)}")


def check_offsets(op: str, offsets_E: torch.Tensor, num_experts: int, num_rows: int) -> None:
    """Shape and dtype always; values (non-decreasing, ending at the row count) only on the CPU (no sync)."""
    check_tensor(op, "offsets_E", offsets_E, dtypes=(torch.int32,), dim=1)
    check(
        offsets_E.shape[0] == num_experts,
        f"{op}: offsets_E must have one entry per expert ({num_experts}), got {offsets_E.shape[0]}",
    )
    if offsets_E.device.type == "cpu" and num_experts:
        check(
            bool((torch.diff(offsets_E) >= 0).all()) and int(offsets_E[0]) >= 0,
            f"{op}: offsets_E must be non-decreasing cumulative row counts",
        )
        check(
            int(offsets_E[-1]) == num_rows,
            f"{op}: offsets_E ends at {int(offsets_E[-1])} but x has {num_rows} rows",
        )


def check_experts(
    op: str, x_ND: torch.Tensor, w_gate_up_E2FD: torch.Tensor, w_down_EDF: torch.Tensor
) -> None:
    num_experts, width2, hidden = w_gate_up_E2FD.shape
    check(
        hidden == x_ND.shape[1] and width2 % 2 == 0,
        f"{op}: w_gate_up_E2FD must be [E, 2F, D={x_ND.shape[1]}], got {tuple(w_gate_up_E2FD.shape)}",
    )
    check(
        tuple(w_down_EDF.shape) == (num_experts, hidden, width2 // 2),
        f"{op}: w_down_EDF must be [E, D, F] = {(num_experts, hidden, width2 // 2)}, "
        f"got {tuple(w_down_EDF.shape)}",
    )


def check_counts(op: str, counts_E: torch.Tensor, num_experts: int, num_rows: int) -> None:
    """Shape and dtype always; values (non-negative, summing to the rows) only on the CPU (no sync)."""
    check_tensor(op, "counts_E", counts_E, dim=1, contiguous=False)
    check(not counts_E.is_floating_point(), f"{op}: counts_E must be an integer tensor")
    check(
        counts_E.shape[0] == num_experts,
        f"{op}: counts_E must have one entry per expert ({num_experts}), got {counts_E.shape[0]}",
    )
    if counts_E.device.type == "cpu" and num_experts:
        check(bool((counts_E >= 0).all()), f"{op}: counts_E must be non-negative")
        total = int(counts_E.sum())
        check(total == num_rows, f"{op}: counts_E sums to {total} but x has {num_rows} rows")


def check_row_weights(op: str, row_weights_N: torch.Tensor | None, num_rows: int) -> None:
    if row_weights_N is None:
        return
    check_tensor(op, "row_weights_N", row_weights_N, dtypes=FLOAT_DTYPES, dim=1, contiguous=False)
    check(
        row_weights_N.shape[0] == num_rows,
        f"{op}: row_weights_N must have one weight per row ({num_rows}), got {row_weights_N.shape[0]}",
    )
