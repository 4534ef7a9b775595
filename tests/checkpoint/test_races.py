"""Concurrent writers, commits, deletes and cancels, each race run many times against a real server.

Every trial asserts the invariant the issue asks for: a committed checkpoint always loads, and all of
it comes from one writer; losers get a clear status (ABORTED / FAILED_PRECONDITION), never UNKNOWN.
"""

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import checkpoint_pb2 as pb

OK = grpc.StatusCode.OK
TRIALS = 24


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def _payload(writer: int, trial: int) -> dict[str, bytes]:
    """Two tensors whose bytes say who wrote them: a mix of writers is visible in either."""
    rng = random.Random(trial * 10 + writer)
    return {name: rng.randbytes(96 << 10) for name in ("a", "b")}


def _commit(job: str, step: int, num_parts: int = 1) -> pb.CommitRequest:
    return pb.CommitRequest(job=job, step=step, num_parts=num_parts)


def _race(*calls) -> list[grpc.StatusCode]:
    """Run the calls at the same instant (a barrier), return each one's status code."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return _code(call)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_saves_of_one_part_leave_one_consistent_winner(server, raw_client) -> None:
    a, b = raw_client(server.address), raw_client(server.address)
    for trial in range(TRIALS):
        payloads = [_payload(0, trial), _payload(1, trial)]
        # equal attempts (attempt 0, what a bare protobuf client sends): the last to finish wins
        codes = _race(
            *(lambda c=c, p=p, t=trial: c.save("race", t, p) for c, p in zip((a, b), payloads, strict=True))
        )
        assert codes == [OK, OK], codes
        assert _code(lambda t=trial: a.stub.Commit(_commit("race", t), timeout=30)) == OK
        loaded = a.load("race", trial)
        assert loaded in payloads, f"trial {trial}: the committed part mixes writers or is corrupt"


def test_concurrent_multi_stream_saves_never_mix_segments(server) -> None:
    """Two clients save the same part over 3 streams each; the newer attempt wins, the other is ABORTED."""
    clients = [CheckpointClient(server.address, streams=3, chunk_bytes=16 << 10, retries=0) for _ in range(2)]
    try:
        for trial in range(TRIALS // 2):
            payloads = [{f"t{i}": torch.full((8192,), float(w * 100 + i)) for i in range(3)} for w in (0, 1)]
            codes = _race(
                *(
                    lambda c=c, p=p, w=w, t=trial: c.save("segs", t, p, attempt=t * 2 + w)
                    for w, (c, p) in enumerate(zip(clients, payloads, strict=True))
                )
            )
            assert codes[1] == OK and codes[0] in (OK, grpc.StatusCode.ABORTED), codes
            clients[0].commit("segs", trial)
            loaded = clients[0].load("segs", trial)
            assert all(torch.equal(loaded[k], payloads[1][k]) for k in loaded), "segments of two saves mixed"
    finally:
        for c in clients:
            c.close()


def test_resave_racing_commit_never_changes_a_committed_part(server, raw_client) -> None:
    raw = raw_client(server.address)
    committed_dir = server.data_dir / "jobs" / "recommit" / "committed"
    for trial in range(TRIALS):
        first, second = _payload(0, trial), _payload(1, trial)
        raw.save("recommit", trial, first)
        save_code, commit_code = _race(
            lambda t=trial, p=second: raw.save("recommit", t, p),
            lambda t=trial: raw.stub.Commit(_commit("recommit", t), timeout=30),
        )
        assert commit_code == OK
        assert save_code in (OK, grpc.StatusCode.FAILED_PRECONDITION), save_code
        # an OK re-save was published before the commit took the step, so the commit holds it
        assert raw.load("recommit", trial) == (second if save_code == OK else first)
    assert not [p for p in committed_dir.rglob("*") if p.name.endswith(".tmp")]


def test_zombie_attempt_is_refused_once_a_newer_attempt_exists(server, raw_client) -> None:
    raw = raw_client(server.address)
    old, new = _payload(0, 99), _payload(1, 99)
    release = threading.Event()
    sent = threading.Event()
    header = raw.header("zombie", 1, old, attempt=5)

    def zombie_requests():
        for i, request in enumerate(raw.requests(header, old)):
            if i == 2:
                sent.set()
                release.wait(20)
            yield request

    zombie = raw.stub.Save.future(zombie_requests(), timeout=30)
    assert sent.wait(10)
    raw.save("zombie", 1, new, attempt=6)  # the restarted rank saves its part
    release.set()
    with pytest.raises(grpc.RpcError) as err:
        zombie.result()
    assert err.value.code() == grpc.StatusCode.ABORTED and "attempt" in err.value.details()
    late = _code(lambda: raw.save("zombie", 1, old, attempt=4))  # an even older one arriving now
    assert late == grpc.StatusCode.ABORTED
    raw.stub.Commit(_commit("zombie", 1), timeout=30)
    assert raw.load("zombie", 1) == new


def test_latest_and_list_racing_delete_never_fail(server) -> None:
    with CheckpointClient(server.address, retries=0) as client:
        for step in range(1, 61):
            client.save("lat", step, {"w": torch.full((4,), float(step))})
            client.commit("lat", step)
        done = threading.Event()
        answers: list[object] = []

        def hammer() -> None:
            while not done.is_set():
                answers.append(client.latest("lat"))
                answers.append(len(client.list("lat")))

        readers = [threading.Thread(target=hammer) for _ in range(4)]
        for t in readers:
            t.start()
        try:
            for step in range(60, 0, -1):
                client.delete("lat", step)
        finally:
            done.set()
            for t in readers:
                t.join(30)
        assert len(answers) > 60 and client.latest("lat") is None


@pytest.mark.parametrize("trigger", ["delete", "retention"])
def test_delete_during_load_is_not_corruption(make_server, raw_client, trigger: str) -> None:
    srv = make_server(None, "--keep-last", "1", "--read-chunk-bytes", str(16 << 10))
    raw = raw_client(srv.address)
    tensors = {f"t{i}": bytes([i]) * (64 << 10) for i in range(4)}
    outcomes = set()
    for trial in range(12):
        step = trial * 2 + 1
        for part in range(4):  # four part files: the load opens them one after the other
            raw.save("del", step, {f"p{part}.{k}": v for k, v in tensors.items()}, part=part)
        raw.stub.Commit(_commit("del", step, num_parts=4), timeout=30)
        stream = raw.stub.Load(pb.LoadRequest(job="del", step=step), timeout=30)
        received, code = 0, OK
        try:
            for i, message in enumerate(stream):
                received += len(message.data)
                if i == trial % 6:
                    if trigger == "delete":
                        raw.stub.Delete(pb.DeleteRequest(job="del", step=step), timeout=30)
                    else:  # committing the next step makes retention remove this one
                        raw.save("del", step + 1, {"x": b"x"})
                        raw.stub.Commit(_commit("del", step + 1), timeout=30)
        except grpc.RpcError as exc:
            code = exc.code()
        assert code in (OK, grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND), (trial, code)
        if code == OK:
            assert received == 16 * (64 << 10)  # finished: every byte, verified
        outcomes.add(code)
        if trigger == "retention":
            raw.stub.Delete(pb.DeleteRequest(job="del", step=step + 1), timeout=30)
    assert grpc.StatusCode.DATA_LOSS not in outcomes


def test_cancelled_saves_leak_no_file_descriptor_or_thread(make_server, raw_client, poll) -> None:
    srv = make_server(None, "--max-save-streams", "2", "--max-load-streams", "1")
    raw = raw_client(srv.address)
    tensors = {"w": os.urandom(2 << 20)}
    raw.save("cancel", 0, tensors)  # warm up: pools and connections exist
    fds, threads = srv.open_fds(), srv.threads()
    rng = random.Random(7)
    cancelled = 0
    for _ in range(60):
        future = raw.stub.Save.future(raw.requests(raw.header("cancel", 1, tensors), tensors), timeout=30)
        time.sleep(rng.uniform(0, 0.02))  # cancel at every point: before the header, mid-open, mid-write
        future.cancel()
        try:
            future.result()  # a save may have finished before the cancel arrived
        except (grpc.FutureCancelledError, grpc.RpcError):
            cancelled += 1
    assert cancelled >= 20
    jobs = srv.data_dir / "jobs"
    poll(lambda: not list(jobs.rglob("*.tmp")), 10, "the cancelled saves' temporary files to go")
    poll(lambda: srv.open_fds() <= fds, 10, f"open descriptors back to {fds} (now {srv.open_fds()})")
    # data pool 2 + 1 + 4 threads and write pool 2 may still start; nothing per cancelled stream
    assert srv.threads() <= threads + 9
    raw.save("cancel", 1, tensors)  # and the server still works
    raw.stub.Commit(_commit("cancel", 1), timeout=30)
    assert raw.load("cancel", 1) == tensors
