"""Shard discovery: the Redis registry (a shard started later joins without a router restart) and DNS."""

from __future__ import annotations

import socket

import torch

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient


def _model_dir(tmp_path):
    torch.manual_seed(6)
    model = DeepSeekV3(ModelConfig.flavour("debug")).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_registry_discovers_a_third_shard(spawn, redis_url, tmp_path, poll_until) -> None:
    model, directory = _model_dir(tmp_path)
    registry = ("--redis-url", redis_url, "--registry-ttl-seconds", "2", "--advertise-address")
    shards = []
    for i in range(2):
        proc = spawn(
            "dsv3.expert_shard", "--capacity", "32", "--device", "cpu", "--shard-id", f"s{i}", start=False
        )
        proc.args += [*registry, proc.address]
        shards.append(proc.start())
    router = spawn(
        "dsv3.router",
        "--model-dir",
        str(directory),
        "--device",
        "cpu",
        "--max-length",
        "64",
        "--redis-url",
        redis_url,
        "--discovery-interval-seconds",
        "0.3",
    )
    prompt = torch.randint(0, 320, (10,)).tolist()
    expected = generate(model, torch.tensor([prompt]), 5)[0, 10:].tolist()
    with RouterClient(router.address) as client:
        assert {s.shard_id for s in client.placement().shards} == {"s0", "s1"}
        third = spawn(
            "dsv3.expert_shard", "--capacity", "32", "--device", "cpu", "--shard-id", "s2", start=False
        )
        third.args += [*registry, third.address]
        third.start()

        def joined() -> bool:
            shards_now = {s.shard_id: s for s in client.placement().shards}
            return "s2" in shards_now and shards_now["s2"].live and len(shards_now["s2"].slots) > 0

        poll_until(joined, 30, "the third shard to join")
        placement = client.placement()
        held = [{(x.layer, x.expert) for x in s.slots} for s in placement.shards]
        every = {(layer, e) for layer in (1, 2) for e in range(16)}
        assert all(sum(slot in h for h in held) == 2 for slot in every)  # still two copies of each
        sizes = sorted(len(h) for h in held)
        assert sum(sizes) == 64 and sizes[-1] - sizes[0] <= 2, sizes  # spread evenly over 3 shards
        for _ in range(3):
            assert client.generate(prompt, 5) == expected
        calls = {s.shard_id: s.compute_calls for s in client.placement().shards}
        assert calls["s2"] > 0  # used, without a router restart
        shards[0].kill()  # its key expires (TTL 2 s): it leaves, and its copies are re-placed
        poll_until(lambda: "s0" not in {s.shard_id for s in client.placement().shards}, 30, "s0 to leave")
        poll_until(
            lambda: (
                all(s.live for s in client.placement().shards)
                and sum(len(s.slots) for s in client.placement().shards) == 64
            ),
            30,
            "two copies again on the remaining shards",
        )
        assert client.generate(prompt, 5) == expected


def test_dns_discovery(spawn, tmp_path) -> None:
    model, directory = _model_dir(tmp_path)
    shard = spawn("dsv3.expert_shard", "--capacity", "32", "--device", "cpu", "--host", "0.0.0.0")
    name = "localhost"
    assert "127.0.0.1" in {i[4][0] for i in socket.getaddrinfo(name, shard.port, type=socket.SOCK_STREAM)}
    router = spawn(
        "dsv3.router",
        "--model-dir",
        str(directory),
        "--device",
        "cpu",
        "--max-length",
        "64",
        "--shards-dns",
        f"{name}:{shard.port}",
    )
    with RouterClient(router.address) as client:
        placement = client.placement()
        assert any(s.address == f"127.0.0.1:{shard.port}" and s.live for s in placement.shards)
        ids = torch.randint(0, 320, (1, 12))
        with torch.no_grad():
            assert (client.forward(ids) - model(ids).logits).abs().max().item() <= 1e-5
