"""`freeze_startup_objects`: objects alive at start-up leave the collector's generations, cycles made
later are still collected, and `thaw_frozen_objects` hands them back."""

from __future__ import annotations

import gc
import weakref

from dsv3.trainer.collector import freeze_startup_objects, thaw_frozen_objects


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_startup_objects_are_frozen_and_new_cycles_still_collected() -> None:
    kept = [_Node() for _ in range(100)]
    try:
        frozen = freeze_startup_objects()
        assert frozen >= len(kept)
        assert all(not any(node is obj for obj in gc.get_objects()) for node in kept[:3])
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        watcher = weakref.ref(a)
        del a, b
        gc.collect()
        assert watcher() is None
    finally:
        thaw_frozen_objects()
    assert gc.get_freeze_count() == 0
    assert any(node is obj for obj in gc.get_objects() for node in kept[:1])
