"""Run a generator a few items ahead in a background thread, with bounded memory.

Why: the checkpoint client's chunks are copied and checksummed (GIL-free work) while gRPC is busy
sending the previous one; the server likewise verifies and stages one chunk while receiving the next.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(source: Iterator[T], depth: int) -> Iterator[T]:
    """Yield `source`'s items, producing up to `depth` of them ahead; its exceptions are re-raised here.

    Closing the returned generator early (the consumer stopped) stops the producer at its next item.
    """
    if depth <= 0:
        yield from source
        return
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        """Queue `entry` unless the consumer went away; False once it has."""
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((_DONE, exc))

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = items.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
