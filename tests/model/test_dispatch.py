"""The local token dispatcher: rows grouped by expert in token order, and a weighted combine."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.dispatch import (
    DispatchError,
    LocalDispatcher,
    Routing,
    inverse_permutation,
    sort_by_expert,
    sum_by_adding,
    sum_by_gathering,
    unpermute_sum,
)


def _routing(tokens: int, top_k: int, experts: int, skew: float = 0.0, dtype=torch.float64) -> Routing:
    logits = torch.randn(tokens, experts) + skew * torch.arange(experts)  # skew leaves experts empty
    ids = logits.topk(top_k, dim=-1).indices
    return Routing(ids, torch.rand(tokens, top_k, dtype=dtype), logits.sigmoid())


@pytest.mark.parametrize("skew", [0.0, 5.0])
def test_dispatch_groups_rows_by_expert_in_token_order(skew: float) -> None:
    tokens, top_k, experts = 40, 3, 8
    routing = _routing(tokens, top_k, experts, skew)
    x_TD = torch.arange(tokens, dtype=torch.float64)[:, None].repeat(1, 5)  # row value = its token
    rows_ND, counts_E, _ = LocalDispatcher(experts).dispatch(x_TD, routing)
    assert counts_E.tolist() == torch.bincount(routing.ids_TK.flatten(), minlength=experts).tolist()
    if skew:
        assert (counts_E == 0).any()
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        tokens_of_e = rows_ND[start : start + count, 0].long()
        expected = (routing.ids_TK == e).any(-1).nonzero().flatten()
        assert torch.equal(tokens_of_e, expected)  # exactly e's tokens, ascending
        start += count


def test_rows_carry_their_weights_and_combine_sums_them_into_tokens() -> None:
    tokens, top_k, experts, hidden = 37, 4, 16, 6
    routing = _routing(tokens, top_k, experts, skew=2.0)
    x_TD = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    weights = routing.weights_TK.requires_grad_(True)
    dispatcher = LocalDispatcher(experts)
    rows_ND, counts_E, handle = dispatcher.dispatch(x_TD, routing)
    # each row's weight is its (token, choice)'s
    expert_N = torch.repeat_interleave(torch.arange(experts), counts_E)
    for i in range(rows_ND.shape[0]):
        t = int((x_TD.detach() == rows_ND[i].detach()).all(-1).nonzero())
        k = int((routing.ids_TK[t] == expert_N[i]).nonzero())
        assert handle.row_weights_N[i] == weights[t, k]
    # expert e scales its rows by e + 1: a per-expert function, so a row sent to the wrong expert shows
    scale_N = (expert_N + 1).to(torch.float64)
    y_TD = dispatcher.combine(rows_ND * scale_N[:, None] * handle.row_weights_N[:, None], handle)
    expected = (weights[..., None] * (routing.ids_TK + 1)[..., None] * x_TD[:, None, :]).sum(1)
    torch.testing.assert_close(y_TD, expected)
    probe = torch.randn(tokens, hidden, dtype=torch.float64)
    got = torch.autograd.grad((y_TD * probe).sum(), (x_TD, weights))
    want = torch.autograd.grad((expected * probe).sum(), (x_TD, weights))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("tokens", [29, 0])
def test_summing_by_gathering_equals_summing_by_adding(tokens: int) -> None:
    """CUDA sums by gathering (no atomics), the CPU by adding rows into tokens: the same sums, gradients."""
    top_k = 3
    order, _ = sort_by_expert(torch.rand(tokens, 8).topk(top_k, -1).indices, 8)
    rows = torch.randn(tokens * top_k, 5, dtype=torch.float64, requires_grad=True)
    added = sum_by_adding(rows, order, tokens, top_k)
    gathered = sum_by_gathering(rows, order, tokens, top_k)
    torch.testing.assert_close(added, gathered)
    if tokens:
        by_hand = torch.stack([rows[(order // top_k) == t].sum(0) for t in range(tokens)])
        torch.testing.assert_close(added, by_hand)
        probe = torch.randn(tokens, 5, dtype=torch.float64)
        g_add, g_gather = (torch.autograd.grad((y * probe).sum(), rows)[0] for y in (added, gathered))
        torch.testing.assert_close(g_add, g_gather)
    bf16 = unpermute_sum(rows.detach().bfloat16(), order, tokens, top_k)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (tokens, 5)


def test_sort_by_expert_and_its_inverse() -> None:
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, counts = sort_by_expert(ids, 4)
    assert order.tolist() == [1, 2, 3, 5, 0, 4] and counts.tolist() == [2, 2, 2, 0]
    assert torch.equal(order[inverse_permutation(order)], torch.arange(6))
    assert torch.equal(inverse_permutation(order)[order], torch.arange(6))


def test_no_tokens() -> None:
    dispatcher = LocalDispatcher(4)
    routing = Routing(torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2), torch.empty(0, 4))
    rows, counts, handle = dispatcher.dispatch(torch.empty(0, 8), routing)
    assert rows.shape == (0, 8) and counts.tolist() == [0, 0, 0, 0]
    assert dispatcher.combine(rows, handle).shape == (0, 8)


@pytest.mark.parametrize(
    ("ids", "weights", "x", "message"),
    [
        (torch.tensor([[0, 4]]), torch.ones(1, 2), torch.ones(1, 3), r"ids must lie in \[0, 4\), got 0..4"),
        (torch.tensor([[-1, 2]]), torch.ones(1, 2), torch.ones(1, 3), "ids must lie"),
        (torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), torch.ones(1, 3), "integer"),
        (torch.tensor([[0, 1]]), torch.ones(1, 3), torch.ones(1, 3), "weights_TK"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2), torch.ones(2, 3), "T=2"),
        (torch.tensor([[0, 1]]), torch.ones(1, 2), torch.ones(1, 1, 3), r"\[T, D\]"),
    ],
)
def test_bad_routing_is_refused_with_the_field_named(ids, weights, x, message) -> None:
    with pytest.raises(DispatchError, match=message):
        LocalDispatcher(4).dispatch(x, Routing(ids, weights, torch.ones(1, 4)))
    with pytest.raises(DispatchError, match="positive"):
        LocalDispatcher(0)
