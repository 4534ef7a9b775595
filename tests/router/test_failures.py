"""Shard loss while serving: SIGKILL with replicas left (no request fails), an expert with no replica
(UNAVAILABLE naming it, then recovery when its shard is back)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(5)
    return DeepSeekV3(ModelConfig.flavour("debug")).eval()


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return directory


def _greedy(model: DeepSeekV3, prompt: list[int], new: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), new)[0, len(prompt) :].tolist()


def _live(client: RouterClient) -> dict[str, tuple[bool, int]]:
    return {s.address: (s.live, len(s.slots)) for s in client.placement().shards}


def test_sigkill_one_of_two_replicas_under_steady_load(spawn, hf_dir, model, poll_until) -> None:
    shards = [spawn("dsv3.expert_shard", "--capacity", "32", "--device", "cpu") for _ in range(2)]
    router = spawn(
        "dsv3.router",
        "--model-dir",
        str(hf_dir),
        "--device",
        "cpu",
        "--replicas",
        "2",
        "--max-length",
        "64",
        "--shards",
        ",".join(s.address for s in shards),
        "--health-interval-seconds",
        "0.2",
    )
    prompts = [torch.randint(0, 320, (n,)).tolist() for n in (3, 8, 12, 5)]
    expected = [_greedy(model, p, 6) for p in prompts]
    results: list[tuple[int, list[int] | str, float]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with RouterClient(router.address, timeout_seconds=30) as client:
            i = worker
            while not stop.is_set():
                begin = time.monotonic()
                try:
                    out: list[int] | str = client.generate(prompts[i % len(prompts)], 6)
                except grpc.RpcError as exc:
                    out = f"{exc.code()}: {exc.details()}"
                results.append((i % len(prompts), out, time.monotonic() - begin))
                i += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    killed_at = len(results)
    shards[0].kill()
    time.sleep(2.0)
    stop.set()
    for w in workers:
        w.join(60)
    failed = [r for r in results if isinstance(r[1], str)]
    assert failed == []
    assert all(out == expected[i] for i, out, _ in results)
    assert len(results) - killed_at >= 3  # requests kept completing after the loss
    worst = max(latency for _, _, latency in results[killed_at:])
    print(f"\nworst request latency during the shard loss: {worst * 1000:.0f} ms ({len(results)} requests)")
    with RouterClient(router.address) as client:
        assert _live(client)[shards[0].address] == (False, 32)  # marked down
        restarted = spawn("dsv3.expert_shard", "--capacity", "32", "--device", "cpu", port=shards[0].port)
        assert restarted.address == shards[0].address
        poll_until(lambda: _live(client)[shards[0].address] == (True, 32), 30, "the shard to come back")
        before = {s.address: s.compute_calls for s in client.placement().shards}
        for p, e in zip(prompts, expected, strict=True):
            assert client.generate(p, 6) == e
        after = {s.address: s.compute_calls for s in client.placement().shards}
        assert after[shards[0].address] > before[shards[0].address]  # used again


def test_expert_without_replica_is_unavailable_then_recovers(spawn, hf_dir, model, poll_until) -> None:
    shards = [spawn("dsv3.expert_shard", "--capacity", "16", "--device", "cpu") for _ in range(2)]
    router = spawn(
        "dsv3.router",
        "--model-dir",
        str(hf_dir),
        "--device",
        "cpu",
        "--replicas",
        "2",
        "--max-length",
        "64",
        "--shards",
        ",".join(s.address for s in shards),
        "--health-interval-seconds",
        "0.2",
    )
    prompt = torch.randint(0, 320, (24,)).tolist()
    expected = _greedy(model, prompt, 4)
    with RouterClient(router.address, timeout_seconds=30) as client:
        placement = client.placement()
        assert [len(s.slots) for s in placement.shards] == [16, 16]  # capacity allows one copy each
        assert client.generate(prompt, 4) == expected
        shards[1].kill()
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt, 4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        match = re.search(r"\(layer (\d+), expert (\d+)\)", err.value.details())
        assert match, err.value.details()
        held = {s.address: {(x.layer, x.expert) for x in s.slots} for s in placement.shards}
        assert (int(match[1]), int(match[2])) in held[shards[1].address]  # one the killed shard held
        with pytest.raises(grpc.RpcError) as err:
            client.forward(torch.tensor([prompt]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "(layer " in err.value.details()
        spawn("dsv3.expert_shard", "--capacity", "16", "--device", "cpu", port=shards[1].port)
        poll_until(lambda: _live(client)[shards[1].address] == (True, 16), 30, "the shard to come back")
        assert client.generate(prompt, 4) == expected


def test_hung_shard_times_out_and_its_rows_go_to_the_other_replica(spawn, hf_dir, model, poll_until) -> None:
    import signal

    shards = [spawn("dsv3.expert_shard", "--capacity", "32", "--device", "cpu") for _ in range(2)]
    router = spawn(
        "dsv3.router",
        "--model-dir",
        str(hf_dir),
        "--device",
        "cpu",
        "--max-length",
        "64",
        "--shards",
        ",".join(s.address for s in shards),
        "--shard-timeout-seconds",
        "1",
    )
    prompt = torch.randint(0, 320, (9,)).tolist()
    expected = _greedy(model, prompt, 4)
    with RouterClient(router.address, timeout_seconds=30) as client:
        shards[0].process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            begin = time.monotonic()
            assert client.generate(prompt, 4) == expected
            assert time.monotonic() - begin < 10  # one deadline, then the other replica
            assert _live(client)[shards[0].address][0] is False
        finally:
            shards[0].process.send_signal(signal.SIGCONT)
        poll_until(lambda: _live(client)[shards[0].address][0], 30, "the shard to be healthy again")
        assert client.generate(prompt, 4) == expected
