"""Limits that keep the server up whatever clients send: counts, concurrent streams, memory, quota."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dsv3.rpc.v1 import checkpoint_pb2 as pb

MIB = 1 << 20


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _stored_bytes(data_dir) -> int:
    return sum(p.stat().st_size for p in (data_dir / "jobs").rglob("*") if p.is_file())


def test_absurd_part_counts_are_refused_at_once(shared_server, raw_client) -> None:
    raw = raw_client(shared_server.address)
    raw.save("counts", 1, {"w": b"1234"})
    rss = shared_server.rss()
    for num_parts in (2**31 - 1, 10**6):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            raw.stub.Commit(pb.CommitRequest(job="counts", step=1, num_parts=num_parts), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_parts" in err.value.details()
        assert time.monotonic() - start < 2 and len(err.value.details()) < 200
    with pytest.raises(grpc.RpcError) as err:  # allowed, but only a few missing parts are named
        raw.stub.Commit(pb.CommitRequest(job="counts", step=1, num_parts=60000), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "59999 of 60000" in err.value.details() and "[1, 2, 3, 4, 5]" in err.value.details()
    assert len(err.value.details()) < 200
    assert _code(lambda: raw.save("counts", 1, {"w": b"1"}, part=1 << 20)) == grpc.StatusCode.INVALID_ARGUMENT
    assert shared_server.rss() - rss < 64 * MIB


def test_fifty_concurrent_save_streams_stay_in_bounded_memory(make_server, raw_client) -> None:
    """The server's RSS stays bounded with 50 streams at once, all complete, and memory comes back."""
    srv = make_server(None)
    raw = raw_client(srv.address)
    data = os.urandom(3 * MIB)
    raw.save("warm", 1, {"w": data})  # pools, connections, first buffers
    idle, peak = srv.rss(), 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, srv.rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [raw_client(srv.address) for _ in range(50)]  # one connection per stream
    try:
        with ThreadPoolExecutor(50) as pool:
            results = list(
                pool.map(
                    lambda i: _code(lambda: clients[i].save("many", 1, {f"w{i}": data}, part=i, timeout=120)),
                    range(50),
                )
            )
    finally:
        done.set()
        sampler.join()
    assert results == [grpc.StatusCode.OK] * 50
    raw.stub.Commit(pb.CommitRequest(job="many", step=1, num_parts=50), timeout=60)
    assert peak - idle < 200 * MIB, f"peak {peak / MIB:.0f} MiB, idle {idle / MIB:.0f} MiB"
    assert srv.rss() - idle < 96 * MIB  # buffers went back after the streams closed
    assert raw.load("many", 1) == {f"w{i}": data for i in range(50)}


def test_streams_beyond_the_waiting_limit_are_refused(make_server, raw_client) -> None:
    srv = make_server(None, "--max-save-streams", "1", "--max-waiting-streams", "1")
    tensors = {"w": os.urandom(MIB)}
    release = threading.Event()

    def stalled(raw, step):
        def requests():
            for i, request in enumerate(raw.requests(raw.header("cap", step, tensors), tensors)):
                if i == 3:
                    release.wait(30)
                yield request

        return raw.stub.Save.future(requests(), timeout=60)

    running = stalled(raw_client(srv.address), 1)
    time.sleep(0.3)  # let it take the one slot before the next arrives (ordering, not a result)
    waiting = stalled(raw_client(srv.address), 2)
    deadline = time.monotonic() + 30  # generous: on a loaded 2-core box one refusal can take seconds
    third = grpc.StatusCode.OK
    while time.monotonic() < deadline:  # until the second stream is queued, a third may still queue
        third = _code(lambda: raw_client(srv.address).save("cap", 3, tensors, timeout=2))
        if third == grpc.StatusCode.RESOURCE_EXHAUSTED:
            break
    assert third == grpc.StatusCode.RESOURCE_EXHAUSTED
    release.set()
    assert running.result().bytes_written > MIB and waiting.result().bytes_written > MIB


def test_quota_is_reserved_atomically_by_concurrent_saves(make_server, raw_client) -> None:
    quota = 8 * MIB
    srv = make_server(None, "--quota-bytes", str(quota))
    clients = [raw_client(srv.address) for _ in range(10)]
    tensors = {"w": os.urandom(3 * MIB)}
    barrier = threading.Barrier(10)

    def save(i: int) -> grpc.StatusCode:
        barrier.wait()
        return _code(lambda: clients[i].save("quota", 1, tensors, part=i))

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(save, range(10)))
    assert codes.count(grpc.StatusCode.OK) == 2, codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert _stored_bytes(srv.data_dir) <= quota


def test_quota_counts_headers_and_metadata(make_server, raw_client) -> None:
    quota = 200_000
    srv = make_server(None, "--quota-bytes", str(quota))
    raw = raw_client(srv.address)
    metadata = {"notes": "x" * 20_000}  # each save: 4 bytes of tensor, 20 kB of header
    codes = [
        _code(lambda s=step: raw.save("meta", s, {"w": b"1234"}, metadata=metadata)) for step in range(20)
    ]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # 20 x 4 bytes of tensors would all have fit
    assert _stored_bytes(srv.data_dir) <= quota


def test_abandoned_uncommitted_parts_expire_and_free_the_quota(make_server, raw_client, poll) -> None:
    srv = make_server(None, "--quota-bytes", str(8 * MIB), "--pending-ttl-seconds", "1")
    raw = raw_client(srv.address)
    raw.save("ttl", 1, {"w": os.urandom(6 * MIB)})  # never committed: the rank died
    assert _code(lambda: raw.save("ttl", 2, {"w": os.urandom(3 * MIB)})) == grpc.StatusCode.RESOURCE_EXHAUSTED
    pending = srv.data_dir / "jobs" / "ttl" / "pending" / "1"
    poll(lambda: not pending.exists(), 10, "the abandoned step to expire")
    raw.save("ttl", 2, {"w": os.urandom(3 * MIB)})
    raw.stub.Commit(pb.CommitRequest(job="ttl", step=2, num_parts=1), timeout=30)


def test_a_step_being_written_does_not_expire(make_server, raw_client) -> None:
    srv = make_server(None, "--pending-ttl-seconds", "1")
    raw = raw_client(srv.address)
    tensors = {"w": os.urandom(MIB)}
    raw.save("busy", 1, tensors, part=0)
    release = threading.Event()

    def slow_requests():
        other = {"v": tensors["w"]}
        for i, request in enumerate(raw.requests(raw.header("busy", 1, other, part=1), other)):
            if i == 2:
                release.wait(30)
            yield request

    writer = raw.stub.Save.future(slow_requests(), timeout=60)
    time.sleep(2.5)  # longer than the TTL while part 1 is still streaming
    release.set()
    writer.result()  # the slow part was not expired under it: its save answers OK
    raw.stub.Commit(pb.CommitRequest(job="busy", step=1, num_parts=2), timeout=30)
    # both parts, the early one included, survived the TTL and are committed with their bytes
    assert raw.load("busy", 1) == {"w": tensors["w"], "v": tensors["w"]}
