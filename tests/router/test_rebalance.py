"""Live re-placement under a steady stream of requests with skewed routing: a Rebalance, a fourth shard
found through the Redis registry, and a SIGKILL of a shard, all mid-stream. No request may fail, every
output must equal the in-process model's, the rebalance must improve balancedness, and after the loss
every expert must be back to two copies on the survivors. Latencies per phase are printed (the timed
comparison lives in benchmarks/bench_replacement.py)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient

HOT = (13,)  # the biased expert of every MoE layer (not one that an idle start gives a spare copy)


@pytest.fixture(scope="module")
def skewed_model(tmp_path_factory):
    torch.manual_seed(11)
    model = DeepSeekV3(ModelConfig.flavour("debug")).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias[list(HOT)] = 1.0  # chosen by almost every token
    directory = tmp_path_factory.mktemp("skewed")
    model.save_pretrained(directory)
    return model, directory


def _copies(placement) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for shard in placement.shards:
        if shard.live:
            for s in shard.slots:
                out[(s.layer, s.expert)] = out.get((s.layer, s.expert), 0) + 1
    return out


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def test_rebalance_scale_out_and_shard_loss_mid_stream(spawn, redis_url, skewed_model, poll_until) -> None:
    model, directory = skewed_model
    registry = ("--redis-url", redis_url, "--registry-ttl-seconds", "2", "--advertise-address")

    def shard(name: str):
        proc = spawn(
            "dsv3.expert_shard", "--capacity", "32", "--device", "cpu", "--shard-id", name, start=False
        )
        proc.args += [*registry, proc.address]
        return proc

    shards = [shard(f"s{i}").start(wait=False) for i in range(3)]
    for proc in shards:
        proc.wait_serving()
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
        "--health-interval-seconds",
        "0.2",
        "--redundant-experts",
        "4",
        "--load-window-seconds",
        "30",
    )
    prompts = [
        torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 9, 6)
    ]
    expected = [generate(model, torch.tensor([p]), 5)[0, len(p) :].tolist() for p in prompts]
    results: list[tuple[float, float, int, list[int] | str]] = []  # start, end, prompt, output or error
    stop = threading.Event()

    def stream(worker: int) -> None:
        with RouterClient(router.address, timeout_seconds=30) as client:
            i = worker
            while not stop.is_set():
                begin = time.monotonic()
                try:
                    out: list[int] | str = client.generate(prompts[i % len(prompts)], 5)
                except grpc.RpcError as exc:
                    out = f"{exc.code()}: {exc.details()}"
                results.append((begin, time.monotonic(), i % len(prompts), out))
                i += 1

    workers = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    marks: dict[str, tuple[float, float]] = {}
    try:
        with RouterClient(router.address, timeout_seconds=60) as client:
            poll_until(lambda: sum(s.live for s in client.placement().shards) == 3, 30, "3 shards serving")
            first = client.placement()
            copies = _copies(first)  # idle start: 2 copies each, the 4 spare slots of a layer to 4 experts
            assert first.version >= 1 and min(copies.values()) == 2 and sum(copies.values()) == 72
            time.sleep(2.0)  # steady traffic fills the load window
            begin = time.monotonic()
            change = client.rebalance().change
            marks["rebalance"] = (begin, time.monotonic())
            assert change.version == first.version + 1 and change.reason == "request"
            assert change.slots_moved > 0
            assert change.balancedness_after < change.balancedness_before - 0.05, change
            hot_copies = _copies(client.placement())
            assert all(hot_copies[(layer, e)] == 3 for layer in (1, 2) for e in HOT)  # one on every shard

            time.sleep(1.0)
            begin = time.monotonic()
            shards.append(shard("s3").start())
            poll_until(
                lambda: sum(s.live for s in client.placement().shards) == 4, 30, "the 4th shard to serve"
            )
            marks["scale 3 -> 4"] = (begin, time.monotonic())
            assert client.placement().last_change.reason == "shards joined"

            time.sleep(1.0)
            begin = time.monotonic()
            shards[1].kill()

            def recovered() -> bool:
                placement = client.placement()
                live = [s for s in placement.shards if s.live]
                copies = _copies(placement)
                return len(live) == 3 and len(copies) == 32 and min(copies.values()) >= 2

            poll_until(recovered, 30, "every expert back to two copies on the 3 survivors")
            marks["SIGKILL"] = (begin, time.monotonic())
            time.sleep(1.0)
            final = client.placement()
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    failed = [r for r in results if isinstance(r[3], str)]
    assert failed == []
    assert all(out == expected[i] for _, _, i, out in results)
    assert final.rebalances >= 3 and final.version >= first.version + 3
    steady = [end - start for start, end, _, _ in results if end < marks["rebalance"][0]]
    assert len(steady) >= 5
    lines = [f"steady p99 {_p99(steady) * 1e3:.0f} ms over {len(steady)} requests"]
    for name, (begin, end) in marks.items():
        during = [e - s for s, e, _, _ in results if e >= begin and s <= end + 0.5]
        lines.append(
            f"{name}: p99 {_p99(during) * 1e3:.0f} ms over {len(during)} requests ({end - begin:.2f} s)"
        )
    print("\n" + "\n".join(lines) + f"\nlongest request {max(e - s for s, e, _, _ in results) * 1e3:.0f} ms")


def test_rebalance_flags_and_their_environment_twins(monkeypatch) -> None:
    from dsv3.router.config import RouterConfig
    from dsv3.serving.flags import parse_config

    base = ["--model-dir", "/m", "--shards", "a:1", "--device", "cpu"]
    monkeypatch.setenv("DSV3_REBALANCE_INTERVAL", "300")  # what the operator sets
    config = parse_config(RouterConfig, base)
    assert config.rebalance_interval == 300.0 and config.redundant_experts == 0
    assert parse_config(RouterConfig, [*base, "--rebalance-interval", "0"]).rebalance_interval == 0
    for flag, value in (
        ("--rebalance-interval", "-1"),
        ("--redundant-experts", "-2"),
        ("--rebalance-tolerance", "-0.5"),
        ("--load-window-seconds", "0"),
    ):
        with pytest.raises(SystemExit):
            parse_config(RouterConfig, [*base, flag, value])
    with pytest.raises(ValueError, match="rebalance_interval"):
        RouterConfig(model_dir="/m", shards="a:1", device="cpu", rebalance_interval=-1)


def test_load_window_follows_recent_traffic_only() -> None:
    from dsv3.router.load_window import LoadWindow
    from dsv3.router.remote import RemoteDispatcher

    now = [0.0]
    layers = [RemoteDispatcher(4), RemoteDispatcher(4)]
    window = LoadWindow(layers, window_seconds=10, clock=lambda: now[0])
    layers[0].loads_E += torch.tensor([5, 0, 0, 0])
    now[0] = 1.0
    window.sample()
    assert window.load_LE().tolist() == [[5, 0, 0, 0], [0, 0, 0, 0]]
    now[0] = 12.0
    layers[1].loads_E += torch.tensor([0, 3, 0, 1])
    assert window.load_LE().tolist() == [[0, 0, 0, 0], [0, 3, 0, 1]]  # the first 5 rows aged out
    assert window.span_seconds() == 11.0
