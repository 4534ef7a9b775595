"""Gradients, expert-load reporting and aux-loss-free balancing on the debug model."""

import torch

from dsv3.balance.bias import apply_bias_update, expert_load, sequence_balance_loss
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.loss import language_model_loss
from dsv3.model.moe import Gate


def test_gradients_reach_every_parameter_but_not_buffers(debug_config: ModelConfig) -> None:
    model = DeepSeekV3(debug_config).train()
    ids = torch.randint(0, 256, (4, 32))
    out = model(ids)
    language_model_loss(out, ids, balance_alpha=1e-3).total.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(not b.requires_grad for b in model.buffers())


def test_expert_loads_count_every_routed_token(debug_model: DeepSeekV3) -> None:
    config = debug_model.config
    with torch.no_grad():
        out = debug_model(torch.randint(0, 256, (2, 10)))
    gates = config.num_moe_layers + config.num_nextn_predict_layers
    assert tuple(out.expert_loads.shape) == (gates, config.n_routed_experts)
    main = out.expert_loads[: config.num_moe_layers].sum(-1)
    assert (main == 2 * 10 * config.num_experts_per_tok).all()
    assert out.expert_loads[-1].sum() == 2 * 9 * config.num_experts_per_tok  # MTP sees T-1 positions


def test_balance_loss_only_when_asked_and_from_what_the_forward_returns(debug_model: DeepSeekV3) -> None:
    ids = torch.randint(0, 256, (2, 10))
    out = debug_model(ids)
    assert language_model_loss(out, ids).balance is None
    parts = language_model_loss(out, ids, balance_alpha=0.01)
    assert parts.balance is not None and parts.balance.item() > 0
    assert torch.allclose(parts.total, language_model_loss(out, ids).total + parts.balance)
    config = debug_model.config
    assert len(out.routings) == config.num_moe_layers + config.num_nextn_predict_layers
    by_hand = sum(
        sequence_balance_loss(r.scores_TE.view(2, -1, 16), r.ids_TK.view(2, -1, 4), 0.01)
        for r in out.routings
    )
    assert torch.allclose(parts.balance, by_hand)


def test_loads_of_micro_batches_add_up_to_the_whole_batch(debug_model: DeepSeekV3) -> None:
    """The trainer sums loads over micro-batches before one bias update: that equals the whole batch's."""
    ids = torch.randint(0, 256, (4, 12))
    with torch.no_grad():
        whole = debug_model(ids).expert_loads
        parts = debug_model(ids[:1]).expert_loads + debug_model(ids[1:]).expert_loads
    assert torch.equal(whole, parts)


def test_bias_updates_balance_a_skewed_router(debug_config: ModelConfig) -> None:
    gate = Gate.from_config(debug_config.replace(n_group=1, topk_group=1))
    hidden = debug_config.hidden_size
    common = torch.randn(hidden)
    x = torch.randn(512, hidden) + 2 * common  # every token shares a direction ...
    with torch.no_grad():
        gate.weight.normal_(std=0.02)
        gate.weight[:3] = common / common.norm()  # ... that three experts are aligned with

    def imbalance() -> float:
        load = expert_load(gate(x).ids_TK, debug_config.n_routed_experts).float()
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(100):
        loads = expert_load(gate(x).ids_TK, debug_config.n_routed_experts)
        apply_bias_update([gate.e_score_correction_bias], loads[None], gamma=0.01)
    assert start > 3.0
    assert imbalance() < 1.5


def test_model_bias_update_moves_towards_balance(debug_model: DeepSeekV3) -> None:
    with torch.no_grad():
        loads = debug_model(torch.randint(0, 256, (2, 16))).expert_loads
    debug_model.update_routing_bias(loads, gamma=0.5)
    for gate, load in zip(debug_model.gates(), loads, strict=True):
        mean = load.float().mean()
        expected = 0.5 * torch.sign(mean - load.float())
        assert torch.equal(gate.e_score_correction_bias, expected)
