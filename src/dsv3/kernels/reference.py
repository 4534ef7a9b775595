"""Pure-torch reference implementations of every op in `dsv3.kernels.ops`.

These run anywhere (CPU, CUDA, meta) and define the semantics the Triton kernels are tested against.

Shape legend: T tokens, D hidden, K experts per token, E experts, F expert width, N = T*K routed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the checkpoint's reference does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a [..., 2F] tensor holding [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def permute_by_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the N = T*K (token, slot) rows by expert.

    Returns `order_N` (flat row index in expert order; row r is token r // K, slot r % K) and
    `counts_E` (rows per expert). A stable sort keeps each expert's rows in token order.
    """
    flat_N = topk_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return order_N, counts_E


def _experts_looped(
    x_ND: torch.Tensor,
    weights_N: torch.Tensor,
    counts: list[int],
    w_gate_up_EHD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """One matmul pair per expert on contiguous slices; best when the load is very uneven."""
    outputs = []
    # unbind once: indexing w[e] per expert would make autograd zero-fill a full-size gradient per expert.
    for rows, row_weights, w_gate_up, w_down in zip(
        x_ND.split(counts),
        weights_N.split(counts),
        w_gate_up_EHD.unbind(0),
        w_down_EDF.unbind(0),
        strict=True,
    ):
        if rows.shape[0] == 0:
            continue
        outputs.append((swiglu(rows @ w_gate_up.T) * row_weights[:, None]) @ w_down.T)
    if not outputs:
        return x_ND.new_zeros(0, w_down_EDF.shape[1])
    return torch.cat(outputs)


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _can_group(x_ND: torch.Tensor, width: int) -> bool:
    """torch's CPU grouped GEMM covers fp32/bf16/fp16 rows aligned to 16 bytes; the rest take the loop."""
    if not hasattr(torch, "_grouped_mm") or x_ND.device.type != "cpu" or x_ND.dtype not in _GROUPED_MM_DTYPES:
        return False
    return all(size * x_ND.element_size() % 16 == 0 for size in (x_ND.shape[1], width))


def _experts_grouped(
    x_ND: torch.Tensor,
    weights_N: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Both expert GEMMs as single grouped GEMMs over the expert-sorted rows (empty experts cost nothing)."""
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    hidden_NF = swiglu(torch._grouped_mm(x_ND, w_gate_up_EHD.transpose(-2, -1), offs=offsets_E))
    hidden_NF = hidden_NF * weights_N[:, None]
    return torch._grouped_mm(hidden_NF, w_down_EDF.transpose(-2, -1), offs=offsets_E)


def moe_experts(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_gate_up_EHD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert SwiGLU FFN: y[t] = sum_k w[t,k] * down_e(silu(gate_e(x)) * up_e(x)), e = ids[t,k].

    `w_gate_up_EHD` is [E, 2F, D] (gate rows then up rows), `w_down_EDF` is [E, D, F].
    Tokens are dispatched by one sort; there is no Python loop over tokens.
    """
    num_tokens, top_k = topk_ids_TK.shape
    num_experts = w_gate_up_EHD.shape[0]
    order_N, counts_E = permute_by_expert(topk_ids_TK, num_experts)
    x_ND = x_TD.index_select(0, order_N // top_k)
    # The combine weight scales the F-wide hidden rows before the down projection (linear, so equal to
    # scaling the D-wide outputs after it, and F < D moves less memory).
    weights_N = topk_weights_TK.reshape(-1).index_select(0, order_N).to(x_ND.dtype)
    if order_N.numel() and _can_group(x_ND, w_down_EDF.shape[2]):
        out_ND = _experts_grouped(x_ND, weights_N, counts_E, w_gate_up_EHD, w_down_EDF)
    else:
        out_ND = _experts_looped(x_ND, weights_N, counts_E.tolist(), w_gate_up_EHD, w_down_EDF)
    # Combine: add each row into its token. On the CPU index_add_ runs in index order (deterministic);
    # on CUDA it uses atomics unless torch.use_deterministic_algorithms(True) is set.
    y_TD = out_ND.new_zeros(num_tokens, out_ND.shape[1])
    return y_TD.index_add(0, order_N // top_k, out_ND).to(x_TD.dtype)
