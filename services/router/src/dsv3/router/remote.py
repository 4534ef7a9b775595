"""How the router plugs the expert shards into the model's own MoE forward.

`MoE.forward` stays the model's: gate -> `dispatcher.dispatch` -> `experts(rows, counts, weights)` ->
`dispatcher.combine` (+ shared experts). The router swaps, per MoE layer:
- the dispatcher for a `RemoteDispatcher`: the local sort by expert (every expert is "local" to the
  router's view: the rows are grouped by layer-wide expert), plus the per-layer expert-load record;
- the experts for `RemoteExperts`: one `ShardPool.compute` per layer and step, i.e. one `Compute` per
  involved shard, the rows' combine weights sent along (the shards apply them, as `GroupedExperts` does).

The forward is synchronous torch code running in the router's model thread; `RemoteExperts` hands the
fan-out to the event loop (`run_coroutine_threadsafe`) and blocks that thread, not the loop, until
every shard has answered.
"""

from __future__ import annotations

import asyncio
import time

import torch
from torch import nn

from dsv3.model.dispatch import LocalDispatcher, LocalHandle, Routing
from dsv3.model.moe import MoE
from dsv3.router import tracing
from dsv3.router.pool import ShardPool
from dsv3.serving import telemetry

# One MoE layer's fan-out to the shards and back, as the model thread waits for it.
DISPATCH_TIME = telemetry.meter("dsv3.router").create_histogram("dsv3_router_dispatch_duration", unit="s")


class RemoteDispatcher(LocalDispatcher):
    """Groups rows by layer-wide expert (as `LocalDispatcher`) and records the layer's expert loads."""

    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts)
        self.loads_E = torch.zeros(num_experts, dtype=torch.int64)

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, LocalHandle]:
        rows, counts_E, handle = super().dispatch(x_TD, routing)
        self.loads_E += counts_E.cpu()
        return rows, counts_E, handle


class RemoteExperts(nn.Module):
    """A MoE layer's routed experts, computed on the expert shards (no parameters here)."""

    def __init__(
        self, layer: int, num_experts: int, pool: ShardPool | None, loop: asyncio.AbstractEventLoop | None
    ):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.first_expert = 0
        self.pool = pool
        self.loop = loop

    def forward(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, row_weights_N: torch.Tensor
    ) -> torch.Tensor:
        if self.pool is None or self.loop is None:
            raise RuntimeError(f"layer {self.layer}: routed experts live on shards, none attached")
        if rows_ND.shape[0] == 0:
            return rows_ND.clone()
        started = time.perf_counter()
        with tracing.layer_span(self.layer, rows_ND.shape[0]) as context:
            calls = self.pool.compute(
                self.layer, rows_ND.detach().cpu(), counts_E.tolist(), row_weights_N.detach().cpu()
            )
            future = asyncio.run_coroutine_threadsafe(tracing.run_in(context, calls), self.loop)
            out = future.result().to(rows_ND.device)
        DISPATCH_TIME.record(time.perf_counter() - started, {"layer": str(self.layer)})
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts} (remote)"


def detach_experts(model: nn.Module) -> list[tuple[int, MoE]]:
    """Replace every main-layer MoE's experts by `RemoteExperts` (unattached); returns (layer, MoE) pairs.

    Works on a model built on the meta device, before it is materialised: the routed experts' memory is
    never allocated. MTP blocks' experts become remote too, under their release layer index
    (num_hidden_layers + k - 1); `mtp_layers` lists them for speculative decoding.
    """
    layers: list[tuple[int, MoE]] = []
    for index, decoder in enumerate(model.model.layers):
        if isinstance(decoder.mlp, MoE):
            num = decoder.mlp.experts.num_experts
            decoder.mlp.experts = RemoteExperts(index, num, None, None)
            decoder.mlp.dispatcher = RemoteDispatcher(num)
            layers.append((index, decoder.mlp))
    for index, (_, moe) in enumerate(mtp_layers(model), start=len(model.model.layers)):
        num = moe.experts.num_experts
        moe.experts = RemoteExperts(index, num, None, None)
        moe.dispatcher = RemoteDispatcher(num)
    return layers


def mtp_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """The MTP blocks' MoE layers as (release layer index, MoE): what the shards hold for speculation."""
    first = len(model.model.layers)
    return [
        (first + k, module.block.mlp)
        for k, module in enumerate(model.mtp)
        if isinstance(module.block.mlp, MoE)
    ]


def attach(layers: list[tuple[int, MoE]], pool: ShardPool, loop: asyncio.AbstractEventLoop) -> None:
    for _, moe in layers:
        moe.experts.pool = pool
        moe.experts.loop = loop
