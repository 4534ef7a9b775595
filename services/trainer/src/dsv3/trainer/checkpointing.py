"""Checkpoints through the checkpoint service: one part per rank, committed by rank 0 once all are in.

Everything is stored by name, as full tensors, so any parallel layout can resume any other:
- weights under the Hugging Face release names (`model.layers.{l}.mlp.experts.{e}.*` per expert, the
  routing biases included): rank 0 writes the replicated tensors, the ranks of data-parallel replica 0
  write their experts;
- AdamW moments as `optimizer.exp_avg.<release name>` / `optimizer.exp_avg_sq.<release name>`, written
  by each parameter's ZeRO owner (replicated parameters from EP rank 0's data-parallel group only);
- `trainer.rng.{rank}`: the rank's torch RNG state;
- commit metadata (JSON under `trainer`): step, sequences consumed (the data position; the schedule is a
  function of the step), loss, layout, tokens seen.
The save `attempt` is torchrun's restart count, so a zombie rank of an earlier attempt cannot overwrite
a part of its successor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import grpc
import torch
import torch.distributed as dist

from dsv3.checkpoint import CheckpointClient
from dsv3.model import DeepSeekV3
from dsv3.model.hf_names import to_hf_state_dict, to_release_names
from dsv3.trainer.parallel import Groups, ShardedAdamW, is_expert

log = logging.getLogger(__name__)
_RELEASE_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclasses.dataclass(frozen=True)
class Resumed:
    step: int
    consumed: int  # sequences of the global stream already trained on
    tokens: int
    metadata: dict


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Checkpointer:
    def __init__(
        self,
        client: CheckpointClient,
        job: str,
        model: DeepSeekV3,
        optimizer: ShardedAdamW,
        groups: Groups,
        keep_last: int = 0,
    ) -> None:
        self.client, self.job, self.model, self.optimizer, self.groups = client, job, model, optimizer, groups
        self.keep_last = keep_last
        self.last_committed: int | None = None

    # ---- what this rank stores ------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        layout = self.groups.layout
        out = {}
        for name, tensor in to_hf_state_dict(self.model).items():
            if _RELEASE_EXPERT.search(name):
                if layout.dp_rank == 0:
                    out[name] = tensor
            elif layout.rank == 0:
                out[name] = tensor
        return out

    def _moment_views(self) -> dict[str, torch.Tensor]:
        """Release-named views of the moments this rank is responsible for storing (and loading)."""
        layout = self.groups.layout
        out: dict[str, torch.Tensor] = {}
        for kind in MOMENTS:
            internal = {
                name: self.optimizer.state_of(name)[kind]
                for name in self.optimizer.owned
                if is_expert(name) or layout.ep_rank == 0
            }
            named = to_release_names(self.model, internal)
            out.update({f"optimizer.{kind}.{n}": t for n, t in named.items()})
        return out

    def _moments_to_load(self) -> dict[str, torch.Tensor]:
        """Views of every owned parameter's moments (replicas outside EP rank 0 load them too)."""
        out: dict[str, torch.Tensor] = {}
        for kind in MOMENTS:
            internal = {name: self.optimizer.state_of(name)[kind] for name in self.optimizer.owned}
            named = to_release_names(self.model, internal)
            out.update({f"optimizer.{kind}.{n}": t for n, t in named.items()})
        return out

    # ---- save -----------------------------------------------------------------------------------
    def save(self, step: int, consumed: int, tokens: int, metrics: dict) -> None:
        """Save this rank's part; after a barrier rank 0 commits and applies retention."""
        layout = self.groups.layout
        tensors = {**self._weights(), **self._moment_views()}
        tensors[f"trainer.rng.{layout.rank}"] = torch.get_rng_state()
        tensors = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
        self.client.save(self.job, step, tensors, part=layout.rank, attempt=restart_count())
        if self.groups.world is not None:
            dist.barrier()
        if layout.rank == 0:
            meta = {
                "step": step,
                "consumed": consumed,
                "tokens": tokens,
                "world": layout.world,
                "ep": layout.ep,
                "dp": layout.dp,
                **metrics,
            }
            self.client.commit(self.job, step, num_parts=layout.world, metadata={"trainer": json.dumps(meta)})
            log.info("checkpoint committed: job=%s step=%d parts=%d", self.job, step, layout.world)
            if self.keep_last:
                for old in self.client.list(self.job)[: -self.keep_last]:
                    self.client.delete(self.job, old)
        self.last_committed = step

    # ---- resume ---------------------------------------------------------------------------------
    def _latest(self) -> int | None:
        found: list[int | None] = [None]
        if self.groups.layout.rank == 0:
            try:
                found = [self.client.latest(self.job)]
            except grpc.RpcError as exc:
                raise RuntimeError(
                    f"checkpoint: the checkpoint service at {self.client.address} answered "
                    f"{exc.code().name}: {exc.details()}"
                ) from exc
        if self.groups.world is not None:
            dist.broadcast_object_list(found, src=0)  # every rank resumes the same step
        return found[0]

    @torch.no_grad()
    def restore(self) -> Resumed | None:
        """Load the job's latest committed checkpoint into model and optimizer (any saved layout)."""
        step = self._latest()
        if step is None:
            return None
        info = next(c for c in self.client.checkpoints(self.job) if c.step == step)
        meta = json.loads(info.metadata["trainer"])
        targets = dict(to_release_names(self.model, self.model.state_dict()))
        targets.update(self._moments_to_load())
        rng_name = f"trainer.rng.{self.groups.layout.rank}"
        same_world = meta["world"] == self.groups.layout.world
        loaded = self.client.load(self.job, step, names=[*targets, *([rng_name] if same_world else [])])
        for name, target in targets.items():
            source = loaded[name]
            if source.shape != target.shape:
                raise ValueError(
                    f"checkpoint {self.job}@{step}: {name} has shape {tuple(source.shape)}, "
                    f"the model wants {tuple(target.shape)}"
                )
            target.copy_(source)
        self.optimizer.set_step_count(step)
        if same_world:
            torch.set_rng_state(loaded[rng_name])
        self.last_committed = step
        if self.groups.layout.rank == 0:
            log.info("resumed job=%s from step %d (saved on %d ranks)", self.job, step, meta["world"])
        return Resumed(step, int(meta["consumed"]), int(meta["tokens"]), meta)
