"""`dsv3.serving.threads`: a helper thread that calls `use_for_bookkeeping` runs torch on one thread
without lowering the compute thread's count (torch's OpenMP thread count is per thread)."""

from __future__ import annotations

import threading

import torch

from dsv3.serving import threads


def test_helper_threads_run_single_threaded_and_leave_the_compute_thread_alone() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def helper() -> None:
            threads.use_for_bookkeeping()
            torch.ones(1000).sum()  # a torch op on this thread
            seen.append(torch.get_num_threads())

        worker = threading.Thread(target=helper)
        worker.start()
        worker.join()
        assert seen == [1]
        assert torch.get_num_threads() == 2
        assert threads.running_with(1, torch.get_num_threads)() == 1
        assert threads.running_with(0, torch.get_num_threads)() == threads.compute_threads()
    finally:
        torch.set_num_threads(before)


def test_router_refuses_negative_decode_threads() -> None:
    import pytest

    from dsv3.router.config import RouterConfig

    with pytest.raises(ValueError, match="decode_threads"):
        RouterConfig(model_dir="/m", shards="a:1", device="cpu", decode_threads=-1)
