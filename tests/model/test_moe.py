"""DeepSeekMoE routing and expert computation."""

import pytest
import torch

from dsv3.kernels import ops, reference
from dsv3.model import ModelConfig
from dsv3.model.dispatch import LocalDispatcher
from dsv3.model.moe import Gate, GroupedExperts, MoE


def _gate(**change) -> Gate:
    config = ModelConfig.from_hf_config(ModelConfig.flavour("debug").to_hf_config() | change)
    gate = Gate.from_config(config)
    torch.nn.init.normal_(gate.weight, std=0.5)
    return gate


def test_bias_changes_choice_but_not_weights() -> None:
    gate = _gate(n_group=1, topk_group=1)
    x = torch.randn(64, gate.weight.shape[1])
    before = gate(x)
    favoured = torch.tensor([3, 7])
    gate.e_score_correction_bias[favoured] = 10.0
    after = gate(x)
    assert not torch.equal(before.ids_TK.sort(-1).values, after.ids_TK.sort(-1).values)
    assert torch.isin(favoured, after.ids_TK).all(dim=0).all()
    assert (after.ids_TK == 3).any(-1).all() and (after.ids_TK == 7).any(-1).all()
    # weights are the *unbiased* sigmoid scores of the chosen experts, normalised and scaled
    chosen = after.scores_TE.gather(1, after.ids_TK)
    expected = chosen / chosen.sum(-1, keepdim=True) * gate.scaling
    assert torch.allclose(after.weights_TK, expected)
    assert (after.weights_TK < 10).all()


def test_weights_normalised_and_scaled() -> None:
    gate = _gate()
    routing = gate(torch.randn(32, gate.weight.shape[1]))
    assert torch.allclose(routing.weights_TK.sum(-1), torch.full((32,), gate.scaling))
    unnormalised = _gate(norm_topk_prob=False)
    unnormalised.load_state_dict(gate.state_dict())
    raw = unnormalised(torch.randn(32, gate.weight.shape[1]))
    assert torch.allclose(raw.weights_TK, raw.scores_TE.gather(1, raw.ids_TK) * gate.scaling)


def test_group_limit_masks_whole_groups() -> None:
    gate = _gate()  # 16 experts, 4 groups of 4, keep 2 groups, top-4
    x = torch.randn(256, gate.weight.shape[1])
    routing = gate(x)
    groups = routing.ids_TK // 4
    assert all(g.unique().numel() <= 2 for g in groups)
    # the kept groups are those with the largest sum of their top-2 biased scores
    choice = routing.scores_TE + gate.e_score_correction_bias
    group_score = choice.view(-1, 4, 4).topk(2, dim=-1).values.sum(-1)
    best = group_score.topk(2, dim=-1).indices.sort(-1).values
    for t in range(x.shape[0]):
        assert set(groups[t].tolist()) <= set(best[t].tolist())


def test_group_limit_can_exclude_the_best_single_expert() -> None:
    gate = _gate()
    with torch.no_grad():
        gate.weight.zero_()
        # group 0 has one very strong expert; groups 2 and 3 have two good experts each
        gate.e_score_correction_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 3, 3, 0, 0]))
    routing = gate(torch.randn(4, gate.weight.shape[1]))
    assert not (routing.ids_TK == 0).any()
    assert set(routing.ids_TK[0].tolist()) == {8, 9, 12, 13}


def test_gate_refuses_sizes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="groups must divide"):
        Gate(16, 10, 2, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="top_k"):
        Gate(16, 8, 9)


def test_moe_layer_is_gate_dispatch_experts_combine_plus_shared() -> None:
    config = ModelConfig.flavour("debug")
    layer = MoE.from_config(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, config.hidden_size)
    y, routing = layer(x)
    x_TD = x.view(-1, config.hidden_size)
    # by hand, token by token
    expected = layer.shared_experts(x_TD).clone()
    w_gu, w_d = layer.experts.gate_up_proj, layer.experts.down_proj
    for t in range(x_TD.shape[0]):
        for e, w in zip(routing.ids_TK[t].tolist(), routing.weights_TK[t], strict=True):
            gate, up = (w_gu[e] @ x_TD[t]).chunk(2)
            expected[t] += w * (w_d[e] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(y.view(-1, config.hidden_size), expected, atol=1e-5)
    assert isinstance(layer.dispatcher, LocalDispatcher) and layer.dispatcher.num_experts == 16


def test_grouped_experts_built_from_sizes_hold_any_slice() -> None:
    experts = GroupedExperts(3, 8, 5, first_expert=7)
    assert experts.gate_up_proj.shape == (3, 10, 8) and experts.down_proj.shape == (3, 8, 5)
    assert "experts=7..9" in repr(experts)
    with pytest.raises(ValueError, match="width"):
        GroupedExperts(3, 8, 0)


def test_grouped_and_looped_expert_paths_agree_with_gradients() -> None:
    rows, hidden, experts, width = 128, 16, 8, 12
    counts = torch.tensor([30, 0, 0, 40, 1, 57, 0, 0])  # empty experts included
    x_ND = torch.randn(rows, hidden, requires_grad=True)
    w_gu = torch.randn(experts, 2 * width, hidden, requires_grad=True)
    w_d = torch.randn(experts, hidden, width, requires_grad=True)
    probe = torch.randn(rows, hidden)
    assert reference._can_group(x_ND, width)  # the grouped path really runs below
    results = []
    for path in (reference.grouped_swiglu, lambda x, c, a, b: reference._swiglu_looped(x, c.tolist(), a, b)):
        out = path(x_ND, counts, w_gu, w_d)
        grads = torch.autograd.grad((out * probe).sum(), (x_ND, w_gu, w_d))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_no_rows_still_gives_zero_weight_gradients() -> None:
    """An expert-parallel rank that receives no row must still produce (zero) gradients, not None."""
    w_gu = torch.randn(4, 2 * 8, 16, requires_grad=True)
    w_d = torch.randn(4, 16, 8, requires_grad=True)
    out = ops.grouped_swiglu(torch.randn(0, 16), torch.zeros(4, dtype=torch.long), w_gu, w_d)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert w_gu.grad is not None and not w_gu.grad.any() and w_d.grad is not None and not w_d.grad.any()
