"""One Save stream on the server: attempt claim, quota reservation, part writer, publication.

`close()` undoes whatever the stream still holds (temporary file, descriptor, reservation, claim)
whatever point it reached, and is safe to call twice; the servicer calls it in a `finally` after
every thread the stream started has finished (`threads.run_to_end`).
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

from dsv3.checkpoint.partfile import PartKey, PartWriter, TensorEntry
from dsv3.checkpoint.quota import Reservation, SpaceLedger, save_footprint
from dsv3.checkpoint.storage import Layout


class SaveSession:
    def __init__(
        self,
        layout: Layout,
        ledger: SpaceLedger,
        key: PartKey,
        entries: list[TensorEntry],
        metadata: dict[str, str],
        write_pool: Executor,
    ) -> None:
        self.layout = layout
        self.ledger = ledger
        self.key = key
        self.writer = PartWriter(key, entries, metadata)
        self.write_pool = write_pool
        self._claimed = False
        self._reservation: Reservation | None = None

    def open(self) -> None:
        """Blocking: claim the attempt (ABORTED if superseded), reserve the space, create the file."""
        key = self.key
        self.layout.registry.claim(key.job, key.step, key.part, key.attempt)
        self._claimed = True
        data = sum(e.nbytes for e in self.writer.entries)
        self._reservation = self.ledger.reserve(save_footprint(data, len(self.writer.header)))
        self.writer.open(self.layout.incoming(key.job), self.write_pool)

    def write(self, index: int, offset: int, data: Any, crc32: int) -> None:
        self.writer.write_chunk(index, offset, data, crc32)

    def finish(self) -> int:
        """Blocking: make the part durable and publish it as one unit; returns the bytes written."""
        self.writer.close()
        self.layout.publish(self.writer)
        if self._reservation is not None:
            self._reservation.release()  # after the rename: the scan counts the file from now on
        return self.writer.total_bytes

    def close(self) -> None:
        self.writer.abort()
        if self._reservation is not None:
            self._reservation.release()
        if self._claimed:
            self._claimed = False
            self.layout.registry.release(self.key.job, self.key.step)
