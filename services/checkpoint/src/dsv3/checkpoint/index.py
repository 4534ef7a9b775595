"""The servicer's asynchronous view of the index: its own threads, rebuilds, and a health watch.

Why its own threads: a hung Redis blocks each call for the store's timeout; on the default pool
those calls would queue the data path (chunk writes, loads) behind them. Why rebuilds here: when
Redis comes back empty under a running server (IndexLost), the next call rebuilds the index from the
committed manifests on disk and is answered from it, with no restart. The watch pings the index
every second and reports it dead or alive, which the service turns into its health status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dsv3.checkpoint.storage import Layout
from dsv3.checkpoint.store import IndexLost, MetadataStore, reconcile

log = logging.getLogger(__name__)
T = TypeVar("T")


class Index:
    def __init__(self, store: MetadataStore, layout: Layout, threads: int = 4) -> None:
        self.store = store
        self.layout = layout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ckpt-index")
        self._watch_pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-index-watch")
        self._rebuild = asyncio.Lock()
        self._ready = asyncio.Event()
        self._ready.set()

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one store call; after IndexLost, rebuild and run it once more."""
        await self._ready.wait()
        try:
            return await self._thread(fn, *args)
        except IndexLost:
            await self.rebuild()
            return await self._thread(fn, *args)

    async def rebuild(self, manifests: list[dict[str, Any]] | None = None) -> tuple[int, int]:
        """Make the index equal to the manifests on disk (read now unless given) and mark it."""
        lost = manifests is None
        async with self._rebuild:
            if lost and await self._intact():
                return 0, 0  # another caller rebuilt it meanwhile
            self._ready.clear()
            try:
                if manifests is None:
                    manifests = await self._thread(self.layout.committed_manifests)
                await self._thread(self.store.mark)
                counts = await self._thread(reconcile, self.store, manifests)
            finally:
                self._ready.set()
        if lost:
            log.warning("index lost; rebuilt from %d manifests on disk (%d added)", len(manifests), counts[0])
        return counts

    async def _intact(self) -> bool:
        try:
            await self._thread(self.store.ping)
        except IndexLost:
            return False
        return True

    async def put(self, manifest: dict[str, Any]) -> None:
        await self._call(self.store.put, manifest)

    async def remove(self, job: str, step: int) -> None:
        await self._call(self.store.remove, job, step)

    async def get(self, job: str, step: int) -> dict[str, Any] | None:
        return await self._call(self.store.get, job, step)

    async def steps(self, job: str) -> list[int]:
        return await self._call(self.store.steps, job)

    async def newest(self, job: str, present: Callable[[int], bool]) -> dict[str, Any] | None:
        """The manifest of the newest step that is indexed and `present` on disk.

        A step deleted meanwhile is skipped, not an error: Latest racing Delete answers the step before.
        """
        for step in reversed(await self.steps(job)):
            manifest = await self.get(job, step)
            if manifest is not None and present(step):
                return manifest
        return None

    async def watch(self, report: Callable[[bool], Awaitable[None]], every_s: float = 1.0) -> None:
        """Forever: ping the index; on each change of alive/dead call `report(alive)`; rebuild if lost."""
        loop = asyncio.get_running_loop()
        alive = True
        while True:
            try:
                try:
                    await loop.run_in_executor(self._watch_pool, self.store.ping)
                except IndexLost:
                    await self.rebuild()
                now = True
            except Exception as exc:  # any failure to answer (or to rebuild) is a dead index
                if alive:
                    log.warning("index unavailable: %s", exc)
                now = False
            if now != alive:
                alive = now
                await report(alive)
            await asyncio.sleep(every_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._watch_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
