"""The Redis index failing under a running server: restarted empty, hung, killed, or forged."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2

from dsv3.checkpoint import CheckpointClient
from dsv3.rpc.v1 import checkpoint_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_redis_restarted_empty_is_rebuilt_without_a_server_restart(make_server, redis_server) -> None:
    srv = make_server(redis_server.url, "--keep-last", "2")
    tensors = {step: {"w": torch.full((16,), float(step))} for step in (1, 2, 3)}
    with CheckpointClient(srv.address, retries=0) as client:
        for step in (1, 2):
            client.save("job", step, tensors[step])
            client.commit("job", step)
        redis_server.restart_empty()
        assert client.list("job") == [1, 2] and client.latest("job") == 2
        assert torch.equal(client.load("job", 1)["w"], tensors[1]["w"])
        assert _code(lambda: client.save("job", 2, tensors[2])) == grpc.StatusCode.FAILED_PRECONDITION
        redis_server.restart_empty()
        client.save("job", 3, tensors[3])
        client.commit("job", 3)  # retention sees 1 and 2 again and removes 1
        assert client.list("job") == [2, 3]
        assert not (srv.data_dir / "jobs" / "job" / "committed" / f"{1:012d}").exists()
        redis_server.restart_empty()
        client.delete("job", 2)
        assert client.list("job") == [3]


def test_hung_redis_does_not_stall_saves_and_health_says_so(make_server, redis_server, poll) -> None:
    srv = make_server(redis_server.url, "--redis-timeout-seconds", "1")
    tensors = {f"t{i}": torch.randn(64, 64) for i in range(4)}
    with CheckpointClient(srv.address, retries=0, streams=2) as client:
        client.save("hung", 1, tensors)  # warm
        redis_server.pause()
        try:
            with ThreadPoolExecutor(12) as pool:  # a user's script hammering the index
                lists = [pool.submit(_code, lambda: client.list("hung")) for _ in range(12)]
                time.sleep(0.2)  # they are in flight, each stuck for the Redis timeout
                start = time.monotonic()
                client.save("hung", 2, tensors)  # never touches the index
                assert time.monotonic() - start < 2.5
                codes = [f.result(timeout=30) for f in lists]
            assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
            poll(lambda: srv.health() == NOT_SERVING, 15, "health NOT_SERVING with Redis hung")
        finally:
            redis_server.resume()
        poll(lambda: srv.health() == SERVING, 15, "health SERVING again")
        client.commit("hung", 2)
        assert client.list("hung") == [2]


def test_redis_killed_before_commit_leaves_nothing_half_committed(make_server, redis_server) -> None:
    srv = make_server(redis_server.url, "--redis-timeout-seconds", "1")
    tensors = {"w": torch.randn(128, 64)}
    committed = srv.data_dir / "jobs" / "job" / "committed" / f"{5:012d}"
    with CheckpointClient(srv.address, retries=0) as client:
        client.save("job", 5, tensors)
        redis_server.kill()
        assert _code(lambda: client.commit("job", 5)) == grpc.StatusCode.UNAVAILABLE
        assert not committed.exists()  # not on disk as committed while the index does not know it
        assert (srv.data_dir / "jobs" / "job" / "pending" / "5").is_dir()
        redis_server.restart_empty()
        client.commit("job", 5)  # the retry commits the same parts
        assert committed.is_dir() and client.list("job") == [5]
        assert torch.equal(client.load("job", 5)["w"], tensors["w"])


@pytest.mark.parametrize("file", ["../../../../outside.bin", "/etc/passwd", "part-00000.safetensors/../../x"])
def test_forged_manifest_names_are_refused_before_reading(
    make_server, redis_server, raw_client, tmp_path, file: str
) -> None:
    srv = make_server(redis_server.url)
    raw = raw_client(srv.address)
    raw.save("forge", 1, {"w": b"\1" * 1024})
    raw.stub.Commit(pb.CommitRequest(job="forge", step=1, num_parts=1), timeout=30)
    (tmp_path / "outside.bin").write_bytes(b"secret" * 100_000)
    index = redis.Redis.from_url(redis_server.url)
    key = "dsv3:checkpoint:manifest:forge:1"
    manifest = json.loads(index.get(key))
    part = manifest["parts"][0]
    part["file"] = file
    part["size_bytes"] = 600_000
    part["tensors"][0]["nbytes"] = 600_000 - part["header_bytes"]
    index.set(key, json.dumps(manifest))
    index.close()
    received = 0
    with pytest.raises(grpc.RpcError) as err:
        for message in raw.stub.Load(pb.LoadRequest(job="forge", step=1), timeout=30):
            received += len(message.data)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "not a part file" in err.value.details()
    assert received == 0


def test_index_survives_concurrent_restart_and_commits(make_server, redis_server) -> None:
    """Commits keep landing while Redis restarts empty twice; afterwards List shows every one."""
    srv = make_server(redis_server.url, "--redis-timeout-seconds", "1")
    stop = threading.Event()
    committed: list[int] = []

    def commit_loop() -> None:
        with CheckpointClient(srv.address, retries=6, backoff_seconds=0.05) as client:
            step = 0
            while not stop.is_set() and step < 40:
                step += 1
                try:
                    client.save("churn", step, {"w": torch.full((4,), float(step))})
                    client.commit("churn", step)
                    committed.append(step)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc

    worker = threading.Thread(target=commit_loop)
    worker.start()
    for _ in range(2):
        time.sleep(0.3)
        redis_server.restart_empty()
    stop.set()
    worker.join(60)
    with CheckpointClient(srv.address, retries=3, backoff_seconds=0.1) as client:
        listed = client.list("churn")
    assert committed and set(committed) <= set(listed)
    on_disk = sorted(int(p.name) for p in (srv.data_dir / "jobs" / "churn" / "committed").iterdir())
    assert listed == on_disk


def test_client_refuses_a_checkpoint_naming_a_tensor_twice(make_server, redis_server) -> None:
    """A checkpoint from before commit refused duplicates (here: forged) fails to load; no silent pick."""
    srv = make_server(redis_server.url)
    with CheckpointClient(srv.address, streams=1) as client:
        client.save("twice", 1, {"w": torch.ones(4)})
        client.commit("twice", 1)
        index = redis.Redis.from_url(redis_server.url)
        key = "dsv3:checkpoint:manifest:twice:1"
        manifest = json.loads(index.get(key))
        manifest["parts"] = manifest["parts"] * 2
        index.set(key, json.dumps(manifest))
        index.close()
        with pytest.raises(ValueError, match="more than once"):
            client.load("twice", 1)
