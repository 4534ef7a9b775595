"""Parallelism applied to a built model, from process groups passed in (the model holds no globals).

`parallelize_experts(model, group)`: expert parallelism. On each rank of `group` every MoE layer keeps
only its slice of the routed experts (rank r of W: experts [r E/W, (r+1) E/W), copied out of the full
layer so every rank starts from the same weights) and exchanges rows with the other ranks through an
`AllToAllDispatcher`. Gates, shared experts, attention and everything else stay replicated; their
gradients are per-rank partial sums that data parallelism reduces as usual, while each expert's gradient
is already complete on its owner.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from dsv3.model.dispatch import AllToAllDispatcher, DispatchError, LocalDispatcher
from dsv3.model.moe import GroupedExperts, MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def parallelize_experts(model: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Shard every MoE layer's routed experts over `group` (in place; returns `model`).

    Call on every rank of `group` with identically initialised (or loaded) models, before building the
    optimizer: the expert parameters are replaced by their local slices.
    """
    layers = moe_layers(model)
    for layer in layers:
        experts = layer.experts
        whole = isinstance(experts, GroupedExperts) and experts.first_expert == 0
        if not (whole and isinstance(layer.dispatcher, LocalDispatcher)) or (
            experts.num_experts != layer.dispatcher.num_experts
        ):
            raise DispatchError("parallelize_experts: a MoE layer's experts are already sharded")
        dispatcher = AllToAllDispatcher(group, layer.experts.num_experts)
        layer.experts = layer.experts.sliced(dispatcher.first_expert, dispatcher.num_local_experts)
        layer.dispatcher = dispatcher
    return model
