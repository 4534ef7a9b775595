"""DeepSeekMoE routing and expert computation."""

import pytest
import torch

from dsv3.kernels import ops
from dsv3.model import ModelConfig
from dsv3.model.moe import Gate, MoE


def _gate(**change) -> Gate:
    config = ModelConfig.from_hf_config(ModelConfig.flavour("debug").to_hf_config() | change)
    gate = Gate(config)
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


def _naive_moe(x, ids, weights, w_gate_up, w_down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, k] * (w_down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("skew", [0.0, 5.0])
def test_moe_experts_matches_per_token_loop(skew: float) -> None:
    tokens, hidden, experts, width, top_k = 40, 12, 8, 6, 3
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    logits = torch.randn(tokens, experts) + skew * torch.arange(experts)  # skew leaves experts empty
    ids = logits.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, dtype=torch.float64)
    w_gate_up = torch.randn(experts, 2 * width, hidden, dtype=torch.float64)
    w_down = torch.randn(experts, hidden, width, dtype=torch.float64)
    if skew:
        assert torch.bincount(ids.flatten(), minlength=experts).eq(0).any()
    got = ops.moe_experts(x, ids, weights, w_gate_up, w_down)
    assert torch.allclose(got, _naive_moe(x, ids, weights, w_gate_up, w_down))


def test_moe_experts_rejects_bad_shapes() -> None:
    x, ids, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    gu, down = torch.randn(3, 10, 8), torch.randn(3, 8, 5)
    with pytest.raises(ops.KernelInputError, match="w_down"):
        ops.moe_experts(x, ids, w, gu, torch.randn(3, 8, 4))
    with pytest.raises(ops.KernelInputError, match="topk_ids"):
        ops.moe_experts(x, ids[:3], w, gu, down)
    with pytest.raises(ops.KernelInputError, match="integer"):
        ops.moe_experts(x, ids.float(), w, gu, down)
    assert ops.moe_experts(x, ids, w, gu, down).shape == (4, 8)


def test_moe_layer_adds_shared_experts() -> None:
    config = ModelConfig.flavour("debug")
    layer = MoE(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, config.hidden_size)
    y, routing = layer(x)
    x_TD = x.view(-1, config.hidden_size)
    routed = ops.moe_experts(
        x_TD, routing.ids_TK, routing.weights_TK, layer.experts.gate_up_proj, layer.experts.down_proj
    )
    assert torch.allclose(y.view(-1, config.hidden_size), routed + layer.shared_experts(x_TD), atol=1e-6)


def test_grouped_and_looped_expert_paths_agree_with_gradients() -> None:
    from dsv3.kernels import reference

    tokens, hidden, experts, width, top_k = 64, 16, 8, 12, 2
    ids = (torch.randn(tokens, experts) + 4 * (torch.arange(experts) < 5)).topk(top_k, -1).indices
    assert torch.bincount(ids.flatten(), minlength=experts).eq(0).any()  # empty experts included
    x_ND = torch.randn(tokens * top_k, hidden, requires_grad=True)
    counts = torch.bincount(ids.flatten().sort().values, minlength=experts)
    w_gu = torch.randn(experts, 2 * width, hidden, requires_grad=True)
    w_d = torch.randn(experts, hidden, width, requires_grad=True)
    weights_N = torch.rand(tokens * top_k, requires_grad=True)
    probe = torch.randn(tokens * top_k, hidden)
    results = []
    for path in (reference._experts_grouped, reference._experts_looped):
        counts_arg = counts if path is reference._experts_grouped else counts.tolist()
        out = path(x_ND, weights_N, counts_arg, w_gu, w_d)
        grads = torch.autograd.grad((out * probe).sum(), (x_ND, weights_N, w_gu, w_d))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
