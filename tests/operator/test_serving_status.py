"""The operator reads a real router's placement: router + 2 expert shards on loopback serve a debug
model, a Rebalance moves the placement on, and the serving job's status fields follow the router."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.operator import handlers
from dsv3.operator.router_status import read_placement
from dsv3.rpc.v1 import router_pb2


def test_a_real_router_reports_its_placement_to_the_operator(tmp_path: Path, spawn) -> None:
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.flavour("debug")).eval()
    model.save_pretrained(tmp_path / "model")
    shards = [spawn("dsv3.expert_shard", "--capacity", "40", "--device", "cpu", "--shard-id", f"s{i}")
              for i in range(2)]  # fmt: skip
    router = spawn("dsv3.router", "--model-dir", str(tmp_path / "model"), "--device", "cpu",
                   "--max-length", "64", "--shards", ",".join(s.address for s in shards),
                   "--redundant-experts", "4")  # fmt: skip
    assert read_placement("127.0.0.1:1", timeout=0.5) is None  # nothing there: no answer, no error

    first = read_placement(router.address)
    assert first is not None and first.version >= 1 and first.live_shards == 2
    from dsv3.router import RouterClient

    with RouterClient(router.address) as client:
        for n in (5, 9):
            client.generate(list(range(1, n)), max_tokens=4)  # some load for the window
        change = client.stub.Rebalance(router_pb2.RebalanceRequest(tolerance=0.0), timeout=60).change
    after = read_placement(router.address)
    assert after.version == change.version and after.rebalances >= first.rebalances
    assert after.balancedness >= 1.0

    status: dict = {"shards": {"replicas": 2, "ready": 2}}
    handlers._read_placement(router.address, handlers.CONFIG, status)
    assert status["placementVersion"] == after.version and status["shards"]["live"] == 2
    assert status["balancedness"] == after.balancedness and status["rebalances"] == after.rebalances
