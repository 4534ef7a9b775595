"""Router + 2 expert shards as real processes: Forward and greedy Generate equal the in-process model."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.router import RouterClient


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(2)
    model = DeepSeekV3(ModelConfig.flavour("debug")).eval()
    with torch.no_grad():  # non-zero selection biases: the router must read them from the checkpoint
        for gate in model.gates():
            gate.e_score_correction_bias.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def cluster(spawn_module, hf_dir):
    shards = [spawn_module("dsv3.expert_shard", "--capacity", "32", "--device", "cpu") for _ in range(2)]
    router = spawn_module(
        "dsv3.router",
        "--model-dir",
        str(hf_dir),
        "--device",
        "cpu",
        "--replicas",
        "2",
        "--shards",
        ",".join(s.address for s in shards),
        "--max-length",
        "128",
    )
    with RouterClient(router.address, timeout_seconds=60) as client:
        yield router, shards, client


def _greedy(model: DeepSeekV3, prompt: list[int], new: int) -> list[int]:
    out = generate(model, torch.tensor([prompt]), new)
    return out[0, len(prompt) :].tolist()


def test_forward_equals_in_process(cluster, model) -> None:
    _, _, client = cluster
    ids = torch.randint(0, 320, (2, 24))
    logits = client.forward(ids)
    with torch.no_grad():
        expected = model(ids).logits
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= 1e-5
    assert expected.abs().max().item() > 1e-2


def test_one_compute_per_shard_per_moe_layer(cluster) -> None:
    _, _, client = cluster
    before = {s.address: s.compute_calls for s in client.placement().shards}
    client.forward(torch.randint(0, 320, (4, 32)))  # 128 tokens x 4 choices over 16 experts, 2 MoE layers
    after = {s.address: s.compute_calls for s in client.placement().shards}
    calls = {a: after[a] - before[a] for a in after}
    assert all(0 <= n <= 2 for n in calls.values()), calls  # at most one per MoE layer
    assert sum(calls.values()) >= 2, calls  # each MoE layer called at least one shard


def test_placement_every_expert_on_both_shards(cluster) -> None:
    _, _, client = cluster
    placement = client.placement()
    assert placement.replicas == 2 and len(placement.shards) == 2
    assert all(s.live for s in placement.shards)
    expected = {(layer, e) for layer in (1, 2) for e in range(16)}
    for shard in placement.shards:
        held = [(s.layer, s.expert) for s in shard.slots]
        assert len(held) == len(set(held))  # never two copies on one shard
        assert set(held) == expected
    assert placement.balancedness >= 1.0


def test_concurrent_greedy_generate_equals_in_process(cluster, model) -> None:
    _, _, client = cluster
    prompts = [torch.randint(0, 320, (n,)).tolist() for n in (3, 11, 6, 17)]
    expected = [_greedy(model, p, 8) for p in prompts]
    results: list[list[int] | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = client.generate(prompts[i], max_tokens=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


def test_stream_and_sampling_params(cluster) -> None:
    _, _, client = cluster
    prompt = [5, 6, 7]
    streamed = list(client.stream(prompt, max_tokens=5))
    assert streamed == client.generate(prompt, max_tokens=5) and len(streamed) == 5
    stop = streamed[2]
    assert client.generate(prompt, max_tokens=5, stop=[stop]) == streamed[: streamed.index(stop) + 1]
    a = client.generate(prompt, max_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = client.generate(prompt, max_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert a == b and len(a) == 6 and all(0 <= t < 320 for t in a)
    assert client.generate(prompt, max_tokens=6, temperature=0.5, top_k=1, seed=3) == client.generate(
        prompt, max_tokens=6
    )  # top-1 sampling is greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt_ids=[1, 320], max_tokens=3), "prompt_ids"),
        (dict(prompt_ids=[-1], max_tokens=3), "prompt_ids"),
        (dict(prompt_ids=[], max_tokens=3), "prompt_ids"),
        (dict(prompt_ids=[1], max_tokens=0), "max_tokens"),
        (dict(prompt_ids=[1] * 100, max_tokens=29), "max_tokens"),
        (dict(prompt_ids=[1], max_tokens=3, temperature=-0.5), "temperature"),
        (dict(prompt_ids=[1], max_tokens=3, top_p=1.5), "top_p"),
        (dict(prompt_ids=[1], max_tokens=3, top_p=-0.1), "top_p"),
    ],
)
def test_bad_generate_requests_are_invalid_argument(cluster, kwargs, field) -> None:
    _, _, client = cluster
    with pytest.raises(grpc.RpcError) as err:
        client.generate(**kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    assert len(client.generate([1, 2], max_tokens=2)) == 2  # others keep being served


def test_bad_forward_requests_are_invalid_argument(cluster) -> None:
    _, _, client = cluster
    for ids, what in (([[0, 320]], "in [0, 320)"), (torch.zeros(3, dtype=torch.long), "[batch, tokens]")):
        with pytest.raises(grpc.RpcError) as err:
            client.forward(ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("input_ids") and what in err.value.details()
    from dsv3.rpc.v1 import router_pb2, tensor_pb2

    short = tensor_pb2.Tensor(dtype=tensor_pb2.INT64, shape=[1, 4], data=b"\0" * 8)  # 8 bytes, not 32
    for bad in (short, tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1, 1], data=b"\0" * 4)):
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Forward(router_pb2.ForwardRequest(input_ids=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("input_ids")
    assert client.forward([[1, 2, 3]]).shape == (1, 3, 320)


def test_rebalance_keeps_a_placement_that_cannot_improve_and_refuses_a_bad_tolerance(cluster) -> None:
    _, _, client = cluster
    before = client.placement()
    change = client.rebalance().change  # both shards hold every expert: nothing to gain
    assert change.version == before.version and change.slots_moved == 0 and change.reason == "request"
    assert client.placement().version == before.version
    with pytest.raises(grpc.RpcError) as err:
        client.rebalance(tolerance=-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("tolerance")
