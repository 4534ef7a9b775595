"""The expert shards as the router sees them: membership, health, slots held, and the per-layer fan-out.

Everything here runs on the router's event loop. `compute` is one MoE layer of one forward step: each
chosen expert goes to one live replica (least outstanding rows), the rows are grouped per shard, every
involved shard gets one `Compute` request, all concurrently, as a message on that shard's open
`ComputeStream` (`compute_stream.py`; a traced step uses unary `Compute` calls instead). A shard that
fails or times out is marked down and its rows are re-sent to other replicas within the same step;
with no replica left the step fails with `ExpertUnavailable` naming (layer, expert). A down shard is
health-checked until it answers, then a re-plan gives it slots again (a restarted shard comes back
empty); losing it re-plans over the others at once, so its copies are re-created there. Placement
itself lives in `dsv3.router.rebalance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv3.router import tracing
from dsv3.router.compute_stream import ComputeStream, rpc_error
from dsv3.router.placement import Slot
from dsv3.router.rebalance import Change, Placer
from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc
from dsv3.serving import tensor_codec

log = logging.getLogger(__name__)
COMPUTE = "/dsv3.rpc.v1.ExpertShardService/Compute"


class ExpertUnavailable(RuntimeError):
    """No live shard holds (layer, expert)."""

    def __init__(self, layer: int, expert: int) -> None:
        super().__init__(f"expert (layer {layer}, expert {expert}) has no live replica")
        self.slot = (layer, expert)


@dataclasses.dataclass
class Shard:
    address: str
    channel: grpc.aio.Channel
    stub: expert_pb2_grpc.ExpertShardServiceStub
    health: health_pb2_grpc.HealthStub
    stream: ComputeStream  # the Compute hot path (unary Compute only for traced calls)
    shard_id: str = ""
    capacity: int = 0
    live: bool = False  # routed to (has its slots of the current map)
    healthy: bool = False  # answered its last probe and has not failed since: may get slots
    held: set[Slot] = dataclasses.field(default_factory=set)  # the router's map: what it routes here
    loaded: set[Slot] = dataclasses.field(default_factory=set)  # what the shard holds (held + preloaded)
    outstanding: int = 0  # rows in flight
    rows_sent: int = 0
    calls: int = 0


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """What LoadSlots requests carry besides the slots: the weight source and the expert sizes."""

    hidden_size: int
    moe_intermediate_size: int
    hf_directory: str | None = None
    checkpoint_job: str | None = None
    checkpoint_step: int | None = None

    def request(self, slots: list[Slot]) -> expert_pb2.LoadSlotsRequest:
        ids = [expert_pb2.SlotId(layer=l, expert=e) for l, e in slots]
        kwargs = dict(
            slots=ids, hidden_size=self.hidden_size, moe_intermediate_size=self.moe_intermediate_size
        )
        if self.hf_directory is not None:
            return expert_pb2.LoadSlotsRequest(
                **kwargs, hf_directory=expert_pb2.HfDirectorySource(path=self.hf_directory)
            )
        source = expert_pb2.CheckpointSource(
            job=self.checkpoint_job or "",
            step=self.checkpoint_step or 0,
            latest=self.checkpoint_step is None,
        )
        return expert_pb2.LoadSlotsRequest(**kwargs, checkpoint=source)


class ShardPool:
    def __init__(
        self,
        slots: list[Slot],
        load: LoadSpec,
        replicas: int,
        timeout_seconds: float,
        load_timeout_seconds: float,
        max_message_bytes: int,
        redundant: int = 0,
        tolerance: float = 0.05,
    ) -> None:
        self.slots = slots  # every (layer, expert) the model routes to
        self.load = load
        self.replicas = replicas
        self.timeout = timeout_seconds
        self.load_timeout = load_timeout_seconds
        self.options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.shards: dict[str, Shard] = {}
        self.replan_lock = asyncio.Lock()
        self.placer = Placer(self, redundant, tolerance)
        self._revive: dict[str, asyncio.Task] = {}

    # ---- membership ------------------------------------------------------------------------------
    async def _probe(self, shard: Shard) -> bool:
        """Health SERVING and Status answered: learn id, capacity and the slots it really holds."""
        try:
            reply = await shard.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            status = await shard.stub.Status(expert_pb2.ShardStatusRequest(), timeout=5)
        except grpc.RpcError:
            return False
        shard.shard_id, shard.capacity = status.shard_id, status.capacity
        shard.held = {(s.slot.layer, s.slot.expert) for s in status.slots}
        shard.loaded = set(shard.held)
        shard.healthy = True
        return True

    def _connect(self, address: str) -> Shard:
        channel = grpc.aio.insecure_channel(address, options=self.options)  # traced per call: tracing.py
        stub = expert_pb2_grpc.ExpertShardServiceStub(channel)
        return Shard(
            address, channel, stub, health_pb2_grpc.HealthStub(channel), ComputeStream(stub, address)
        )

    async def set_members(self, addresses: set[str], forget_missing: bool) -> None:
        """New addresses are probed and join (with a re-plan); missing ones leave if `forget_missing`."""
        joined = False
        for address in sorted(addresses - self.shards.keys()):
            shard = self._connect(address)
            if await self._probe(shard):
                shard.live = False  # serves once its planned slots are loaded (in replan)
                self.shards[address] = shard
                joined = True
                log.info("shard %s (%s) joined, capacity %d", address, shard.shard_id, shard.capacity)
            else:
                await shard.channel.close()
        left = sorted(self.shards.keys() - addresses) if forget_missing else []
        for address in left:
            shard = self.shards.pop(address)
            shard.live = False
            log.info("shard %s left", address)
            with contextlib.suppress(Exception):
                await shard.stream.aclose()
                await shard.channel.close()
        if joined or left:
            await self.replan("shards joined" if joined else "shards left")

    async def replan(self, reason: str = "replan") -> Change:
        """Re-place the slots over the healthy shards and apply the change while serving."""
        return await self.placer.rebalance(reason)

    def mark_down(self, shard: Shard) -> None:
        if shard.live:
            log.warning("shard %s marked down", shard.address)
        was_healthy = shard.healthy
        shard.live = shard.healthy = False
        shard.stream.close(f"shard {shard.address} marked down")
        if was_healthy and self.shards.get(shard.address) is shard:
            self.placer.soon("shard lost")  # re-create its copies on the others
        if shard.address not in self._revive or self._revive[shard.address].done():
            self._revive[shard.address] = asyncio.get_running_loop().create_task(self._revive_loop(shard))

    async def _revive_loop(self, shard: Shard, interval: float = 0.5) -> None:
        """Health-check a down shard until it serves, then re-plan with it (it gets slots, goes live)."""
        while self.shards.get(shard.address) is shard and not shard.live:
            if await self._probe(shard):
                await self.placer.rebalance("shard back")
                if shard.live:
                    log.info("shard %s is back with %d slots", shard.address, len(shard.held))
                    return
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for task in [*self._revive.values(), self.placer.pending]:
            if task is not None:
                task.cancel()
        for shard in self.shards.values():
            with contextlib.suppress(Exception):
                await shard.stream.aclose()
                await shard.channel.close()

    # ---- the data path ---------------------------------------------------------------------------
    def _choose(self, layer: int, expert: int, rows: int, load: dict[str, int], exclude: set[str]) -> Shard:
        holders = [
            s
            for s in self.shards.values()
            if s.live and (layer, expert) in s.held and s.address not in exclude
        ]
        if not holders:
            raise ExpertUnavailable(layer, expert)
        best = min(holders, key=lambda s: (s.outstanding + load.get(s.address, 0), s.address))
        load[best.address] = load.get(best.address, 0) + rows
        return best

    async def compute(
        self, layer: int, rows_ND: torch.Tensor, counts_E: list[int], weights_N: torch.Tensor
    ) -> torch.Tensor:
        """The weighted expert outputs of rows grouped by expert (counts_E per layer-wide expert)."""
        out = torch.empty_like(rows_ND)
        counts = torch.tensor(counts_E, dtype=torch.int64)
        pending = [e for e, c in enumerate(counts_E) if c > 0]
        exclude: set[str] = set()
        while pending:
            load: dict[str, int] = {}
            groups: dict[str, list[int]] = {}
            shards: dict[str, Shard] = {}
            for e in pending:
                shard = self._choose(layer, e, counts_E[e], load, exclude)
                groups.setdefault(shard.address, []).append(e)
                shards[shard.address] = shard
            # each row's shard (by its expert); rows are grouped by ascending expert, and so is each
            # shard's list of experts, so a shard's rows are the ones marked with its number, in order
            owner_E = torch.full((len(counts_E),), -1, dtype=torch.int64)
            for number, experts in enumerate(groups.values()):
                owner_E[experts] = number
            owner_N = owner_E.repeat_interleave(counts)
            indices = [(owner_N == number).nonzero().squeeze(1) for number in range(len(groups))]
            # every request encoded before the first is sent: the sends then go out back to back
            requests = [
                _request(layer, experts, counts_E, index, rows_ND, weights_N)
                for experts, index in zip(groups.values(), indices, strict=True)
            ]
            calls = [
                self._call(shards[a], request, (index.numel(), rows_ND.shape[1]))
                for a, request, index in zip(groups, requests, indices, strict=True)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            pending = []
            for (address, experts), index, result in zip(groups.items(), indices, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, grpc.RpcError):
                        raise result
                    # Down until its health check passes and its slots are re-synced (a shard that lost
                    # a slot answers FAILED_PRECONDITION and gets it reloaded the same way).
                    log.warning("shard %s failed (%s): re-sending its rows", address, result.code())
                    self.mark_down(shards[address])
                    exclude.add(address)
                    pending += experts
                    continue
                out.index_copy_(0, index, result)
            pending.sort()  # re-sent experts keep the ascending order the grouping relies on
        return out

    async def _call(
        self, shard: Shard, request: expert_pb2.ComputeRequest, shape: tuple[int, int]
    ) -> torch.Tensor:
        shard.outstanding += shape[0]
        shard.calls += 1
        try:
            if tracing.recording():  # a sampled step: one traced call, its span a child of the layer's
                with tracing.client_call(COMPUTE, shard.address) as metadata:
                    reply = await shard.stub.Compute(request, timeout=self.timeout, metadata=metadata)
            else:
                reply = await shard.stream.compute(request, self.timeout)
        finally:
            shard.outstanding -= shape[0]
        shard.rows_sent += shape[0]
        result = tensor_codec.decode(reply.rows)
        if tuple(result.shape) != shape:
            raise rpc_error(
                grpc.StatusCode.INTERNAL, f"shard returned {list(result.shape)} rows for {list(shape)}"
            )
        return result


def _request(
    layer: int,
    experts: list[int],
    counts_E: list[int],
    index: torch.Tensor,
    rows_ND: torch.Tensor,
    weights_N: torch.Tensor,
) -> expert_pb2.ComputeRequest:
    """One shard's share of a layer: its experts' rows (`index`), with their combine weights."""
    return expert_pb2.ComputeRequest(
        layer=layer,
        experts=experts,
        counts=[counts_E[e] for e in experts],
        rows=tensor_codec.encode(rows_ND.index_select(0, index)),
        row_weights=tensor_codec.encode(weights_N.index_select(0, index).float()),
    )
