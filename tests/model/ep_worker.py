"""One rank of the expert-parallel equivalence test, launched by torchrun (gloo on the CPU).

Reads the case the test wrote (layer state, every rank's tokens, the probe), shards the layer's experts
with `parallelize_experts`, runs forward and backward on this rank's tokens and saves what it got.

    python -m torch.distributed.run --standalone --nproc-per-node W tests/model/ep_worker.py CASE OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3.balance.bias import all_reduce_loads, expert_load
from dsv3.model import ModelConfig
from dsv3.model.moe import MoE
from dsv3.model.parallel import parallelize_experts


def main(case_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    case = torch.load(case_path)
    layer = MoE.from_config(ModelConfig.from_hf_config(case["config"]))
    layer.load_state_dict(case["state"])
    if case.get("fp8"):  # before sharding, as the trainer does: the shards keep the experts' precision
        layer.experts.enable_fp8()
    parallelize_experts(layer, dist.group.WORLD)
    assert layer.experts.fp8 == bool(case.get("fp8"))
    x_BTD = case["inputs"][rank].clone().requires_grad_(True)
    y_BTD, routing = layer(x_BTD)
    (y_BTD * case["probes"][rank]).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    torch.save(
        {
            "y": y_BTD.detach(),
            "x_grad": x_BTD.grad,
            "grads": grads,
            "first_expert": layer.experts.first_expert,
            "loads": all_reduce_loads(expert_load(routing.ids_TK, layer.gate.weight.shape[0])),
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
