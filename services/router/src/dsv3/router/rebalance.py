"""Live re-placement of the experts over the shards, without failing or stalling a request.

A change is planned from the observed load (`LoadWindow`) over the healthy shards with the
migration-aware planner (slots stay where they are unless moving them buys balance), then applied in
three phases:
1. preload: every shard loads its new slots (`LoadSlots`) while it keeps serving the old ones; the
   router keeps routing by the old map, so nothing waits on a weight load;
2. switch: the router's map (each shard's `held`) is replaced in one step on the model thread, i.e.
   between two forward steps, so a step sees either the old map or the new one, never a mix;
3. drop: slots no longer in the map are dropped (`DropSlots`); no step can be using them any more.
A shard without room for its new slots first frees slots it loses, but only ones another shard serves
at that moment (switched out of the map, then dropped), in as many waves as that takes.
A shard that fails in phase 1 is marked down and the change is abandoned (the old map stays, which
every healthy shard still serves); the loss triggers a new plan without that shard.

While some expert lacks its copies on live shards (a shard lost, one back empty), the plan only fills
free slots with the missing copies (fewest loads, no waves); balance is restored by the next plan.

Triggers: startup and shards joining or leaving (`ShardPool.set_members`), a shard lost or back
(`ShardPool.mark_down` / its revival), every `--rebalance-interval` seconds, and the `Rebalance` RPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import torch

from dsv3.balance.placement import plan_shards
from dsv3.router.placement import Slot, from_table, map_balancedness, slot_layout, to_table
from dsv3.rpc.v1 import expert_pb2

if TYPE_CHECKING:
    from dsv3.router.load_window import LoadWindow
    from dsv3.router.pool import Shard, ShardPool

log = logging.getLogger(__name__)
RECOVERY_TOLERANCE = 9.0  # accept any balance: only missing copies are loaded
BetweenSteps = Callable[[Callable[[], None]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Change:
    version: int
    reason: str
    slots_moved: int
    balancedness_before: float
    balancedness_after: float
    seconds: float


class Placer:
    def __init__(self, pool: ShardPool, redundant: int = 0, tolerance: float = 0.05) -> None:
        self.pool = pool
        self.layers = sorted({layer for layer, _ in pool.slots})
        self.experts = 1 + max((e for _, e in pool.slots), default=-1)
        self.redundant = redundant
        self.tolerance = tolerance
        self.window: LoadWindow | None = None  # no window: plan as if every expert were equally busy
        self.between_steps: BetweenSteps | None = None  # no model thread: switch at once
        self.version = 0
        self.changes = 0
        self.last: Change | None = None
        self.pending: asyncio.Task | None = None
        self._again: str | None = None

    # ---- what the plan follows -------------------------------------------------------------------
    def load_LE(self) -> torch.Tensor:
        if self.window is None:
            return torch.zeros(len(self.layers), self.experts, dtype=torch.float64)
        return self.window.load_LE()

    def window_balancedness(self) -> float:
        live = [s.held for s in self.pool.shards.values() if s.live]
        return map_balancedness(self.load_LE(), live, self.layers)

    # ---- triggers ----------------------------------------------------------------------------------
    def soon(self, reason: str) -> None:
        """Plan and apply in the background (a shard lost or back). While one is running, one more is
        queued, so a change of the shard set during a plan is never missed."""
        self._again = reason
        if self.pending is None or self.pending.done():
            self.pending = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._again is not None:
            reason, self._again = self._again, None
            try:
                await self.rebalance(reason)
            except Exception:
                log.exception("re-placement (%s) failed", reason)

    async def run_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rebalance("interval")
            except Exception:
                log.exception("periodic re-placement failed")

    # ---- plan and apply -----------------------------------------------------------------------------
    async def rebalance(self, reason: str, tolerance: float | None = None) -> Change:
        async with self.pool.replan_lock:
            begin = time.perf_counter()
            change = await self._rebalance(reason, self.tolerance if tolerance is None else tolerance)
            change = dataclasses.replace(change, seconds=time.perf_counter() - begin)
            if change.version != (self.last.version if self.last else 0):
                self.last = change
            return change

    def _unchanged(self, reason: str, before: float = 1.0) -> Change:
        return Change(self.version, reason, 0, before, before, 0.0)

    async def _rebalance(self, reason: str, tolerance: float) -> Change:
        shards = sorted(
            (s for s in self.pool.shards.values() if s.healthy and s.capacity > 0), key=lambda s: s.address
        )
        layout = slot_layout(
            [s.capacity for s in shards], len(self.layers), self.experts, self.pool.replicas, self.redundant
        )
        if layout is None:
            log.warning("%s: %d healthy shards cannot hold every expert; placement kept", reason, len(shards))
            return self._unchanged(reason)
        load = self.load_LE()
        before = self.window_balancedness()
        current = to_table([s.held for s in shards], layout.sizes, self.layers)
        if not self._redundant_enough(layout.min_copies):
            # copies were lost (or a shard is back empty): restore them into free slots with the
            # fewest loads, whatever the balance; the next interval or Rebalance call re-balances
            tolerance = RECOVERY_TOLERANCE
        plan = await asyncio.to_thread(plan_shards, load, layout.sizes, layout.min_copies, current, tolerance)
        wanted = dict(
            zip((s.address for s in shards), from_table(plan.phy2log, layout.sizes, self.layers), strict=True)
        )
        if all(s.live and s.held == wanted[s.address] for s in shards) and not any(
            s.live for s in self.pool.shards.values() if s.address not in wanted
        ):
            return self._unchanged(reason, before)
        moved = sum(len(wanted[s.address] - s.held) for s in shards)
        if not await self._apply(shards, wanted):
            return self._unchanged(reason, before)  # the old map stays; a failed shard re-plans itself
        self.version += 1
        self.changes += 1
        after = map_balancedness(load, list(wanted.values()), self.layers)
        log.info(
            "placement v%d (%s): %d slots moved, balancedness %.3f -> %.3f",
            self.version,
            reason,
            moved,
            before,
            after,
        )
        return Change(self.version, reason, moved, before, after, 0.0)

    def _redundant_enough(self, min_copies: int) -> bool:
        """Every expert has `min_copies` copies on live shards in the map of the moment."""
        copies: dict[Slot, int] = {}
        for shard in self.pool.shards.values():
            if shard.live:
                for slot in shard.held:
                    copies[slot] = copies.get(slot, 0) + 1
        return all(copies.get(slot, 0) >= min_copies for slot in self.pool.slots)

    async def _switch(self, routes: dict[str, set[Slot]]) -> None:
        """Replace the router's map in one step between forward steps (shards not in `routes` stop)."""

        def switch() -> None:
            for shard in self.pool.shards.values():
                if shard.address in routes:
                    shard.held = set(routes[shard.address])
                    shard.live = bool(shard.held)
                else:
                    shard.live = False  # unhealthy: keeps its old `held` for when it returns

        if self.between_steps is not None:
            await self.between_steps(switch)
        else:
            switch()

    async def _apply(self, shards: list[Shard], wanted: dict[str, frozenset[Slot]]) -> bool:
        """Preload, switch, drop; in waves when a full shard must free a slot before loading one.

        A wave loads what fits; then a full shard frees slots that it loses in the new plan and that
        another shard serves in the map of the moment (switched first, then dropped), and the next
        wave loads into them. Returns False (the map of the moment stays: every slot in it is loaded)
        if a load fails or no slot can be freed safely.
        """
        routes = {s.address: set(s.held) if s.live else set() for s in shards}
        while True:
            loads = []
            for shard in shards:
                add = sorted(wanted[shard.address] - shard.loaded)
                room = shard.capacity - len(shard.loaded)
                if add and room > 0:
                    loads.append(self._load(shard, add[:room]))
            if not all(await asyncio.gather(*loads)):
                return False
            for shard in shards:  # serve what is loaded and wanted, plus what is still loaded and routed
                routes[shard.address] = shard.loaded & (wanted[shard.address] | routes[shard.address])
            if all(wanted[s.address] <= s.loaded for s in shards):
                break
            early: dict[str, list[Slot]] = {}
            for shard in shards:
                need = len(wanted[shard.address] - shard.loaded) - (shard.capacity - len(shard.loaded))
                for slot in sorted(shard.loaded - wanted[shard.address]):
                    if need <= 0:
                        break
                    mine = routes[shard.address]
                    if slot in mine and not any(slot in r for a, r in routes.items() if a != shard.address):
                        continue  # the only copy being served: keep it until another shard has one
                    mine.discard(slot)
                    early.setdefault(shard.address, []).append(slot)
                    need -= 1
            if not early:
                log.warning("placement: no slot can be freed safely for the new plan; kept")
                await self._switch(routes)
                return False
            await self._switch(routes)
            by_address = {s.address: s for s in shards}
            await asyncio.gather(*(self._drop(by_address[a], slots) for a, slots in early.items()))
        await self._switch({a: set(w) for a, w in wanted.items()})
        await asyncio.gather(*(self._drop(s, sorted(s.loaded - wanted[s.address])) for s in shards))
        return True

    async def _load(self, shard: Shard, slots: list[Slot]) -> bool:
        if not slots:
            return True
        try:
            await shard.stub.LoadSlots(self.pool.load.request(slots), timeout=self.pool.load_timeout)
        except grpc.RpcError as exc:
            log.warning("shard %s: preloading %d slots failed: %s", shard.address, len(slots), exc.details())
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.pool.mark_down(shard)  # gone: a new plan without it follows
            return False
        shard.loaded |= set(slots)
        return True

    async def _drop(self, shard: Shard, slots: list[Slot]) -> None:
        if not slots:
            return
        shard.loaded -= set(slots)
        ids = [expert_pb2.SlotId(layer=l, expert=e) for l, e in slots]
        try:
            await shard.stub.DropSlots(expert_pb2.DropSlotsRequest(slots=ids), timeout=30)
        except grpc.RpcError as exc:  # the slots stay loaded there; harmless, and re-synced on its return
            log.warning("shard %s: dropping %d slots failed: %s", shard.address, len(slots), exc.details())

    # ---- reporting ------------------------------------------------------------------------------------
