"""Blocking work off the event loop that a cancelled RPC cannot abandon half-way.

Why: `asyncio.to_thread` stops waiting when its caller is cancelled, but the thread runs on; a Save
cancelled while its part file was being created or written then leaked the file, its descriptor and
its writer thread, because the cleanup ran before (or without) the work it had to undo. Here a
cancelled caller still waits for the thread to finish and only then sees the cancellation, so its
`finally` blocks always clean up after work that is really over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def settle(future: asyncio.Future[Any]) -> bool:
    """Wait until `future` is done, even through cancellations; True if the caller was cancelled."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


async def finish(awaitable: Awaitable[T]) -> T:
    """Run `awaitable` to its end as a task of its own; a caller cancelled meanwhile is told afterwards.

    A thread's or task's own error wins over the cancellation, so that the caller knows it failed.
    """
    future = asyncio.ensure_future(awaitable)
    cancelled = await settle(future)
    if future.exception() is None and cancelled:
        raise asyncio.CancelledError
    return future.result()


async def run_to_end(executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in `executor`; see `finish`."""
    return await finish(asyncio.get_running_loop().run_in_executor(executor, fn, *args))
