"""Process groups, gradient reduction and the ZeRO-1 AdamW of a dp x ep training run.

Ranks form `dp` expert-parallel groups of `ep` consecutive ranks; the data-parallel groups join the ranks
that hold the same expert slice. Every rank computes its loss on its own sequences, scaled by 1/world, so
that summed gradients are the gradient of the global mean:
- replicated parameters (attention, gates, shared experts, norms, embeddings, head) hold per-rank partial
  sums: all-reduced over the whole world;
- routed experts are complete on their owner for its EP group's tokens (the all-to-all backward brings
  them there): all-reduced over the data-parallel group, the replicas of that slice.
The optimizer is ZeRO-1 over the data-parallel group (our own: plain AdamW on the parameters a rank owns,
then a broadcast from each owner), which needs only all-reduce and broadcast, so gloo and NCCL both work,
and keeps state keyed by parameter name for layout-independent checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.moe import GroupedExperts
from dsv3.trainer.config import Layout


@dataclasses.dataclass
class Groups:
    """This rank's groups; None where the group has one member (nothing to communicate)."""

    layout: Layout
    world: dist.ProcessGroup | None
    ep: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    dp_ranks: list[int]  # global ranks of this rank's data-parallel group, by dp rank


def init_groups(layout: Layout, backend: str, timeout_seconds: float) -> Groups:
    """Join the process group from torchrun's environment and build the EP and DP subgroups."""
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if layout.world == 1 and not dist.is_initialized():
        return Groups(layout, None, None, None, [0])
    dist.init_process_group(
        backend,
        store=_attempt_store(layout, timeout),
        rank=layout.rank,
        world_size=layout.world,
        timeout=timeout,
    )
    ep_group = dp_group = None
    dp_ranks: list[int] = []
    for d in range(layout.dp):  # every rank creates every group, in the same order
        ranks = [d * layout.ep + j for j in range(layout.ep)]
        group = dist.new_group(ranks, timeout=timeout) if layout.ep > 1 else None
        if layout.dp_rank == d:
            ep_group = group
    for j in range(layout.ep):
        ranks = [d * layout.ep + j for d in range(layout.dp)]
        group = dist.new_group(ranks, timeout=timeout) if layout.dp > 1 else None
        if layout.ep_rank == j:
            dp_group, dp_ranks = group, ranks
    return Groups(layout, dist.group.WORLD, ep_group, dp_group, dp_ranks)


def _attempt_store(layout: Layout, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, under a prefix per restart of the group.

    torchrun keeps one store for the whole job; without a prefix a restarted rank can read the gloo
    addresses its dead predecessor published and fail to connect (seen with torch 2.13's agent store).
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ.get("MASTER_PORT", "29500")),
        layout.world,
        is_master=not agent_store and layout.rank == 0,
        timeout=timeout,
    )
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dsv3-trainer/restart-{restart}", store)


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name and name.endswith(("gate_up_proj", "down_proj"))


def _all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def reduce_gradients(model: nn.Module, groups: Groups) -> None:
    """Sum replicated gradients over the world and expert gradients over their data-parallel group."""
    replicated, experts = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (experts if is_expert(name) else replicated).append(p.grad)
    _all_reduce_flat(replicated, groups.world)
    _all_reduce_flat(experts, groups.dp)


@torch.no_grad()
def global_grad_norm(model: nn.Module, groups: Groups) -> float:
    """The norm of the whole model's gradient (experts summed over their EP group), after reduction.

    The same number on every rank; NaN or Inf when any gradient element is (the anomaly test's input)."""
    grads = {True: [], False: []}  # is an expert's -> gradients
    for name, p in model.named_parameters():
        grads[is_expert(name)].append(p.grad)

    def squared(tensors: list[torch.Tensor]) -> torch.Tensor:  # per-tensor norms in one foreach pass
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.nn.utils.get_total_norm(tensors, 2.0, foreach=True).double() ** 2

    device = next(model.parameters()).device  # NCCL reduces CUDA tensors only
    replicated, experts = squared(grads[False]), squared(grads[True])
    if groups.ep is not None:
        dist.all_reduce(experts, group=groups.ep)
    return float((replicated + experts).sqrt())


def clip_divisor(norm: float, max_norm: float) -> float:
    """What every gradient is divided by so that the global norm `norm` becomes at most `max_norm`
    (1: no clipping; `max_norm` 0: off). `ShardedAdamW.step` applies it inside the fused update."""
    if max_norm > 0 and max_norm / (norm + 1e-6) < 1:
        return (norm + 1e-6) / max_norm
    return 1.0


class ShardedAdamW:
    """AdamW whose state lives on one rank of the data-parallel group per parameter (ZeRO stage 1)."""

    def __init__(
        self,
        model: nn.Module,
        groups: Groups,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        self.model, self.groups = model, groups
        params = list(model.named_parameters())
        self.owner: dict[str, int] = {}
        loads = [0] * max(len(groups.dp_ranks), 1)
        for name, p in sorted(params, key=lambda item: (-item[1].numel(), item[0])):  # greedy balance
            d = loads.index(min(loads))
            self.owner[name] = d
            loads[d] += p.numel()
        mine = [(n, p) for n, p in params if self.owner[n] == groups.layout.dp_rank]
        self.owned = dict(mine)
        decay = [p for n, p in mine if p.dim() >= 2]
        no_decay = [p for n, p in mine if p.dim() < 2]  # norms: no weight decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=betas,
            eps=eps,
            # torch's fused kernel (CPU and CUDA): one pass per tensor instead of the per-tensor op
            # sequence the CPU default runs (`_single_tensor_adam`, 4% of a small model's step)
            fused=True,
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, grad_divisor: float = 1.0) -> None:
        """Update the owned parameters from their gradients / `grad_divisor` (the clip, done inside the
        fused kernel: no pass of its own over the gradients), then every owner broadcasts its parameters
        to the group."""
        for name, p in self.model.named_parameters():
            if name not in self.owned:
                p.grad = None  # only the owner needs it
        if grad_divisor != 1.0:
            device = next(self.model.parameters()).device
            self.optimizer.grad_scale = torch.tensor(grad_divisor, dtype=torch.float32, device=device)
        try:
            self.optimizer.step()
        finally:
            self.optimizer.__dict__.pop("grad_scale", None)
        if self.groups.dp is not None:
            for name, p in self.model.named_parameters():
                dist.broadcast(p.data, src=self.groups.dp_ranks[self.owner[name]], group=self.groups.dp)

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    # ---- state by parameter name ----------------------------------------------------------------
    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        """exp_avg / exp_avg_sq of an owned parameter (zeros before its first step, created here)."""
        p = self.owned[name]
        state = self.optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}

    def set_step_count(self, steps: int) -> None:
        for p in self.owned.values():
            if self.optimizer.state[p]:
                self.optimizer.state[p]["step"] = torch.tensor(float(steps))


@torch.no_grad()
def gather_experts(model: nn.Module, groups: Groups) -> dict[str, torch.Tensor]:
    """Full stacked expert tensors of every MoE layer, gathered over the EP group (names internal)."""
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, GroupedExperts):
            continue
        for attr in ("gate_up_proj", "down_proj"):
            local = getattr(module, attr).data
            if groups.ep is None:
                out[f"{module_name}.{attr}"] = local.clone()
                continue
            parts = [torch.empty_like(local) for _ in range(groups.layout.ep)]
            dist.all_gather(parts, local.contiguous(), group=groups.ep)
            out[f"{module_name}.{attr}"] = torch.cat(parts)
    return out
