"""The expert shard as a real process: LoadSlots (HF directory, checkpoint service), Compute, Drop, Status."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from dsv3.kernels import ops
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.hf_names import to_hf_state_dict
from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2
from dsv3.serving import tensor_codec


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(1)
    return DeepSeekV3(ModelConfig.flavour("debug")).eval()


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def shard(spawn_module):
    proc = spawn_module("dsv3.expert_shard", "--capacity", "6", "--device", "cpu", "--shard-id", "s0")
    with grpc.insecure_channel(proc.address) as channel:
        yield proc, expert_pb2_grpc.ExpertShardServiceStub(channel)


def _slots(*pairs: tuple[int, int]) -> list[expert_pb2.SlotId]:
    return [expert_pb2.SlotId(layer=l, expert=e) for l, e in pairs]


def _load_hf(stub, directory: Path, *pairs, config=None):
    config = config or ModelConfig.flavour("debug")
    return stub.LoadSlots(
        expert_pb2.LoadSlotsRequest(
            slots=_slots(*pairs),
            hf_directory=expert_pb2.HfDirectorySource(path=str(directory)),
            hidden_size=config.hidden_size,
            moe_intermediate_size=config.moe_intermediate_size,
        ),
        timeout=30,
    )


def _expected(model: DeepSeekV3, layer: int, experts: list[int], counts: list[int], rows, weights):
    moe = model.model.layers[layer].mlp
    index = torch.tensor(experts)
    return ops.grouped_swiglu(
        rows, torch.tensor(counts), moe.experts.gate_up_proj[index], moe.experts.down_proj[index], weights
    )


def _compute(stub, layer, experts, counts, rows, weights):
    reply = stub.Compute(
        expert_pb2.ComputeRequest(
            layer=layer,
            experts=experts,
            counts=counts,
            rows=tensor_codec.encode(rows),
            row_weights=tensor_codec.encode(weights),
        ),
        timeout=10,
    )
    return tensor_codec.decode(reply.rows)


def test_load_from_hf_directory_compute_and_status(shard, model, hf_dir) -> None:
    _, stub = shard
    loaded = _load_hf(stub, hf_dir, (1, 3), (1, 7), (2, 0))
    assert [(s.layer, s.expert) for s in loaded.loaded] == [(1, 3), (1, 7), (2, 0)]
    assert list(_load_hf(stub, hf_dir, (1, 3)).loaded) == []  # already held: nothing new
    rows, weights = torch.randn(5, 64), torch.rand(5)
    with torch.no_grad():
        out = _compute(stub, 1, [7, 3], [2, 3], rows, weights)
        expected = _expected(model, 1, [7, 3], [2, 3], rows, weights)
    assert out.shape == (5, 64) and out.dtype == torch.float32
    assert (out - expected).abs().max().item() <= 1e-6
    assert expected.abs().max().item() > 1e-4
    status = stub.Status(expert_pb2.ShardStatusRequest(), timeout=5)
    assert status.shard_id == "s0" and status.capacity == 6
    tokens = {(s.slot.layer, s.slot.expert): s.tokens for s in status.slots}
    assert tokens == {(1, 3): 3, (1, 7): 2, (2, 0): 0}
    again = stub.Status(expert_pb2.ShardStatusRequest(), timeout=5)
    assert {s.tokens for s in again.slots} == {0}  # counted since the previous call
    dropped = stub.DropSlots(expert_pb2.DropSlotsRequest(slots=_slots((1, 3), (1, 9))), timeout=5)
    assert [(s.layer, s.expert) for s in dropped.dropped] == [(1, 3)]
    with pytest.raises(grpc.RpcError) as err:
        _compute(stub, 1, [3], [1], rows[:1], weights[:1])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "layer 1, expert 3" in err.value.details()
    stub.DropSlots(expert_pb2.DropSlotsRequest(slots=_slots((1, 7), (2, 0))), timeout=5)


def test_bad_requests_name_the_field(shard, hf_dir) -> None:
    proc, stub = shard
    _load_hf(stub, hf_dir, (1, 0), (1, 1))
    rows, weights = torch.randn(3, 64), torch.rand(3)

    def refused(request, code=grpc.StatusCode.INVALID_ARGUMENT, call=stub.Compute) -> str:
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() == code, err.value.details()
        return err.value.details()

    good = dict(layer=1, experts=[0, 1], counts=[1, 2])
    short = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[3, 64], data=b"\0" * 10)
    assert refused(
        expert_pb2.ComputeRequest(**good, rows=short, row_weights=tensor_codec.encode(weights))
    ).startswith("rows")
    assert "counts sum to 3" in refused(
        expert_pb2.ComputeRequest(
            **good, rows=tensor_codec.encode(rows[:2]), row_weights=tensor_codec.encode(weights)
        )
    )
    assert refused(
        expert_pb2.ComputeRequest(
            **good, rows=tensor_codec.encode(rows), row_weights=tensor_codec.encode(weights[:2])
        )
    ).startswith("row_weights")
    assert refused(
        expert_pb2.ComputeRequest(
            layer=1,
            experts=[0, 1],
            counts=[3],
            rows=tensor_codec.encode(rows),
            row_weights=tensor_codec.encode(weights),
        )
    ).startswith("counts")
    assert "hidden size 32" in refused(
        expert_pb2.ComputeRequest(
            **good, rows=tensor_codec.encode(torch.randn(3, 32)), row_weights=tensor_codec.encode(weights)
        )
    )
    assert refused(
        expert_pb2.LoadSlotsRequest(slots=_slots((1, 2)), hidden_size=64, moe_intermediate_size=32),
        call=stub.LoadSlots,
    ).startswith("source")
    assert "hf_directory.path" in refused(
        expert_pb2.LoadSlotsRequest(
            slots=_slots((1, 2)),
            hf_directory=expert_pb2.HfDirectorySource(path="/nonexistent"),
            hidden_size=64,
            moe_intermediate_size=32,
        ),
        call=stub.LoadSlots,
    )
    assert "not (64, 16)" in refused(  # sizes that do not match the held ones
        expert_pb2.LoadSlotsRequest(
            slots=_slots((1, 2)),
            hf_directory=expert_pb2.HfDirectorySource(path=str(hf_dir)),
            hidden_size=64,
            moe_intermediate_size=16,
        ),
        call=stub.LoadSlots,
    )
    assert "no tensors of (layer 0, expert 2)" in refused(  # layer 0 is dense
        expert_pb2.LoadSlotsRequest(
            slots=_slots((0, 2)),
            hf_directory=expert_pb2.HfDirectorySource(path=str(hf_dir)),
            hidden_size=64,
            moe_intermediate_size=32,
        ),
        call=stub.LoadSlots,
    )
    assert "exceeds capacity 6" in refused(
        expert_pb2.LoadSlotsRequest(
            slots=_slots(*[(2, e) for e in range(5)]),
            hf_directory=expert_pb2.HfDirectorySource(path=str(hf_dir)),
            hidden_size=64,
            moe_intermediate_size=32,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        call=stub.LoadSlots,
    )
    assert "checkpoint" in refused(  # started without --checkpoint
        expert_pb2.LoadSlotsRequest(
            slots=_slots((1, 2)),
            checkpoint=expert_pb2.CheckpointSource(job="j", latest=True),
            hidden_size=64,
            moe_intermediate_size=32,
        ),
        call=stub.LoadSlots,
    )
    # still serving, still correct
    assert _compute(stub, 1, [0, 1], [1, 2], rows, weights).shape == (3, 64)
    assert proc.process.poll() is None


def test_compute_stream_answers_in_order_and_survives_refusals(shard, model, hf_dir) -> None:
    """One stream, several requests: each answered in its turn; a refused one gets `error` (the code
    unary Compute would abort with, the field named) and the stream goes on."""
    _, stub = shard
    _load_hf(stub, hf_dir, (2, 4), (2, 5))
    torch.manual_seed(3)
    batches = [(torch.randn(n, 64), torch.rand(n)) for n in (1, 4, 7)]

    def request(rows, weights, experts=(5, 4), counts=None):
        counts = counts or [rows.shape[0] // 2, rows.shape[0] - rows.shape[0] // 2]
        return expert_pb2.ComputeRequest(
            layer=2,
            experts=list(experts),
            counts=counts,
            rows=tensor_codec.encode(rows),
            row_weights=tensor_codec.encode(weights),
        )

    requests = [
        request(*batches[0]),
        request(batches[1][0], batches[1][1][:3]),  # row_weights of the wrong length
        request(*batches[1]),
        request(batches[2][0], batches[2][1], experts=(5, 9)),  # (2, 9) is not held here
        request(*batches[2]),
    ]
    replies = list(stub.ComputeStream(iter(requests), timeout=30))
    assert len(replies) == len(requests)
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[1].error.message.startswith("row_weights")
    assert replies[3].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "layer 2, expert 9" in replies[3].error.message
    for reply, (rows, weights) in zip([replies[0], replies[2], replies[4]], batches, strict=True):
        assert not reply.HasField("error")
        counts = [rows.shape[0] // 2, rows.shape[0] - rows.shape[0] // 2]
        with torch.no_grad():
            expected = _expected(model, 2, [5, 4], counts, rows, weights)
        assert (tensor_codec.decode(reply.rows) - expected).abs().max().item() <= 1e-6
    stub.DropSlots(expert_pb2.DropSlotsRequest(slots=_slots((2, 4), (2, 5))), timeout=5)


def test_loads_only_its_experts_from_the_checkpoint_service(spawn, model, tmp_path) -> None:
    from dsv3.checkpoint import CheckpointClient

    ckpt = spawn("dsv3.checkpoint", "--data-dir", str(tmp_path / "ckpt"), "--min-free-bytes", "0")
    with CheckpointClient(ckpt.address) as client:
        client.save("serve", 5, to_hf_state_dict(model), part=0)
        client.commit("serve", 5, num_parts=1)
    shard = spawn("dsv3.expert_shard", "--capacity", "4", "--device", "cpu", "--checkpoint", ckpt.address)
    with grpc.insecure_channel(shard.address) as channel:
        stub = expert_pb2_grpc.ExpertShardServiceStub(channel)
        loaded = stub.LoadSlots(
            expert_pb2.LoadSlotsRequest(
                slots=_slots((2, 5), (2, 11)),
                checkpoint=expert_pb2.CheckpointSource(job="serve", latest=True),
                hidden_size=64,
                moe_intermediate_size=32,
            ),
            timeout=30,
        )
        assert len(loaded.loaded) == 2
        rows, weights = torch.randn(4, 64), torch.rand(4)
        with torch.no_grad():
            out = _compute(stub, 2, [11, 5], [1, 3], rows, weights)
            assert (out - _expected(model, 2, [11, 5], [1, 3], rows, weights)).abs().max().item() <= 1e-6
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadSlots(
                expert_pb2.LoadSlotsRequest(
                    slots=_slots((2, 6)),
                    checkpoint=expert_pb2.CheckpointSource(job="absent", latest=True),
                    hidden_size=64,
                    moe_intermediate_size=32,
                ),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_announces_itself_and_withdraws_on_sigterm(spawn, redis_url, poll_until) -> None:
    import redis

    proc = spawn(
        "dsv3.expert_shard", "--capacity", "2", "--device", "cpu", "--shard-id", "shard-x", start=False
    )
    proc.args += [
        "--redis-url",
        redis_url,
        "--registry-ttl-seconds",
        "3",
        "--advertise-address",
        proc.address,
    ]
    proc.start()
    client = redis.Redis.from_url(redis_url)
    poll_until(lambda: client.get("dsv3:shards:shard-x") == proc.address.encode(), 10, "the announcement")
    assert 0 < client.pttl("dsv3:shards:shard-x") <= 3000  # expires unless renewed
    assert proc.stop() == 0  # SIGTERM: drains and exits cleanly ...
    assert client.get("dsv3:shards:shard-x") is None  # ... and leaves the registry at once
    client.close()
