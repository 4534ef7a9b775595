"""Aux-loss-free bias update and the sequence-wise balance loss."""

import pytest
import torch

from dsv3.balance.bias import apply_bias_update, bias_update, expert_load, sequence_balance_loss


def test_bias_moves_against_load() -> None:
    load = torch.tensor([[10, 2, 6, 6], [0, 0, 0, 8]])
    step = bias_update(load, gamma=0.1)
    assert torch.allclose(step, torch.tensor([[-0.1, 0.1, 0.0, 0.0], [0.1, 0.1, 0.1, -0.1]]))


def test_apply_updates_each_layer_in_place() -> None:
    biases = [torch.zeros(3), torch.ones(3)]
    apply_bias_update(biases, torch.tensor([[1, 2, 3], [3, 3, 3]]), gamma=0.5)
    assert biases[0].tolist() == [0.5, 0.0, -0.5] and biases[1].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="2 bias tensors but loads for 1"):
        apply_bias_update(biases, torch.tensor([[1, 2, 3]]), gamma=0.5)


def test_expert_load_counts() -> None:
    assert expert_load(torch.tensor([[0, 2], [2, 3]]), 5).tolist() == [1, 0, 2, 1, 0]


def test_sequence_balance_loss_by_hand() -> None:
    # one sequence, 2 tokens, 4 experts, top-1
    scores = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    ids = torch.tensor([[[0], [0]]])
    # f = E/(K T) * counts = 4/2 * [2, 0, 0, 0] = [4, 0, 0, 0]; P_0 = mean(0.5, 0.25) = 0.375
    assert sequence_balance_loss(scores, ids, alpha=0.1).item() == pytest.approx(0.1 * 4 * 0.375)


def test_balanced_routing_minimises_the_loss() -> None:
    uniform = torch.full((1, 4, 4), 0.5)
    balanced = sequence_balance_loss(uniform, torch.tensor([[[0], [1], [2], [3]]]), alpha=1.0)
    skewed = sequence_balance_loss(uniform, torch.tensor([[[0], [0], [0], [0]]]), alpha=1.0)
    assert balanced.item() == pytest.approx(1.0) and skewed.item() == pytest.approx(1.0)
    peaked = torch.tensor([[[0.9, 0.1, 0.1, 0.1]] * 4])
    assert sequence_balance_loss(peaked, torch.tensor([[[0]] * 4]), alpha=1.0) > 1.0
