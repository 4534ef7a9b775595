"""The shard's core, without gRPC: which (layer, expert) slots it holds, and their grouped SwiGLU.

Each layer's held experts live stacked in expert order (`LayerStack`), so a Compute for any subset of
them is one grouped GEMM pair over the whole stack with zero rows for the experts not asked for (they
cost nothing). The set a router asks for changes every step; restacking it per call (a copy of every
requested expert's weights) cost the shard more than the GEMMs. Loads and drops restack their layer.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

import torch

from dsv3.expert_shard.weights import ExpertWeights, Reader
from dsv3.kernels import ops

Slot = tuple[int, int]


class SlotError(ValueError):
    """A request that does not fit (bad field): INVALID_ARGUMENT. `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SlotNotLoaded(SlotError):
    """Compute for a slot this shard does not hold: FAILED_PRECONDITION."""


class CapacityError(SlotError):
    """More slots than `capacity`: RESOURCE_EXHAUSTED."""


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """One layer's held experts, ascending, with their weights stacked: [E, 2F, D] and [E, D, F]."""

    experts: tuple[int, ...]
    position: dict[int, int]  # expert id -> index in the stack
    gate_up_E2FD: torch.Tensor
    down_EDF: torch.Tensor


class SlotStore:
    def __init__(self, capacity: int, device: str = "cpu") -> None:
        self.capacity = capacity
        self.device = torch.device(device)
        self.held: dict[Slot, ExpertWeights] = {}  # views into the layer stacks
        self.sizes: tuple[int, int] | None = None  # (hidden, width) of every held slot
        self.tokens: collections.Counter[Slot] = collections.Counter()
        self._layers: dict[int, LayerStack] = {}
        self._lock = threading.Lock()

    def _restack(self, layer: int) -> None:
        """Rebuild one layer's stack from its held slots (under the lock); the held entries become
        views into it, so the weights are stored once."""
        experts = tuple(sorted(e for l, e in self.held if l == layer))
        if not experts:
            self._layers.pop(layer, None)
            return
        gate_up = torch.stack([self.held[(layer, e)][0] for e in experts])
        down = torch.stack([self.held[(layer, e)][1] for e in experts])
        self._layers[layer] = LayerStack(experts, {e: i for i, e in enumerate(experts)}, gate_up, down)
        for i, e in enumerate(experts):
            self.held[(layer, e)] = (gate_up[i], down[i])

    # ---- slots ----------------------------------------------------------------------------------
    def load(
        self, slots: list[Slot], read: Reader, hidden: int, width: int, dtype: torch.dtype = torch.float32
    ) -> list[Slot]:
        """Read and hold the slots not held yet; all or nothing. Returns the newly loaded ones."""
        if hidden <= 0 or width <= 0:
            raise SlotError(
                "hidden_size", f"hidden_size and moe_intermediate_size must be > 0, got {hidden}, {width}"
            )
        if self.sizes is not None and self.held and self.sizes != (hidden, width):
            raise SlotError(
                "hidden_size", f"this shard holds experts of sizes {self.sizes}, not {(hidden, width)}"
            )
        for layer, expert in slots:
            if layer < 0 or expert < 0:
                raise SlotError("slots", f"layer and expert must be >= 0, got ({layer}, {expert})")
        new = list(dict.fromkeys(s for s in slots if s not in self.held))
        if len(self.held) + len(new) > self.capacity:
            raise CapacityError(
                "slots", f"{len(self.held)} held + {len(new)} new exceeds capacity {self.capacity}"
            )
        weights = read(new) if new else {}
        for slot in new:
            gate_up, down = weights[slot]
            if tuple(gate_up.shape) != (2 * width, hidden) or tuple(down.shape) != (hidden, width):
                raise SlotError(
                    "slots",
                    f"(layer {slot[0]}, expert {slot[1]}) has shapes "
                    f"{tuple(gate_up.shape)}/{tuple(down.shape)}, "
                    f"expected {(2 * width, hidden)}/{(hidden, width)}",
                )
        with self._lock:
            for slot in new:
                gate_up, down = weights[slot]
                self.held[slot] = (gate_up.to(self.device, dtype), down.to(self.device, dtype))
            self.sizes = (hidden, width)
            for layer in {l for l, _ in new}:
                self._restack(layer)
        return new

    def drop(self, slots: list[Slot]) -> list[Slot]:
        with self._lock:
            dropped = [s for s in dict.fromkeys(slots) if self.held.pop(s, None) is not None]
            for layer in {l for l, _ in dropped}:
                self._restack(layer)
        return dropped

    def take_tokens(self) -> dict[Slot, int]:
        """Rows computed per held slot since the previous call (0 for idle slots)."""
        with self._lock:
            out = {slot: self.tokens.get(slot, 0) for slot in sorted(self.held)}
            self.tokens.clear()
        return out

    # ---- compute --------------------------------------------------------------------------------
    def _positions(self, layer: int, experts: list[int]) -> tuple[LayerStack, list[int]]:
        with self._lock:
            stack = self._layers.get(layer)
        positions = [stack.position.get(e, -1) if stack is not None else -1 for e in experts]
        if -1 in positions:
            missing = experts[positions.index(-1)]
            raise SlotNotLoaded("experts", f"slot (layer {layer}, expert {missing}) is not loaded here")
        return stack, positions

    def compute(
        self,
        layer: int,
        experts: list[int],
        counts: list[int],
        rows_ND: torch.Tensor,
        weights_N: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted SwiGLU of each expert's rows (rows grouped in `experts` order)."""
        if len(experts) != len(counts):
            raise SlotError("counts", f"{len(counts)} counts for {len(experts)} experts")
        if len(set(experts)) != len(experts):
            raise SlotError("experts", "an expert appears twice")
        if any(c < 0 for c in counts):
            raise SlotError("counts", "counts must be >= 0")
        if rows_ND.dim() != 2 or not rows_ND.is_floating_point():
            raise SlotError(
                "rows", f"must be a floating [N, hidden] tensor, got {rows_ND.dtype} {list(rows_ND.shape)}"
            )
        if rows_ND.shape[0] != sum(counts):
            raise SlotError("rows", f"{rows_ND.shape[0]} rows but counts sum to {sum(counts)}")
        if weights_N.shape != (rows_ND.shape[0],) or not weights_N.is_floating_point():
            raise SlotError(
                "row_weights",
                f"must be floating [{rows_ND.shape[0]}], got {weights_N.dtype} {list(weights_N.shape)}",
            )
        if not experts:
            return rows_ND.clone()
        stack, positions = self._positions(layer, experts)
        if rows_ND.shape[1] != stack.gate_up_E2FD.shape[2]:
            raise SlotError(
                "rows",
                f"hidden size {rows_ND.shape[1]}, the experts here take {stack.gate_up_E2FD.shape[2]}",
            )
        rows = rows_ND.to(self.device, stack.gate_up_E2FD.dtype)
        weights = weights_N.to(self.device, torch.float32)
        counts_E = torch.zeros(len(stack.experts), dtype=torch.int64)
        counts_E[positions] = torch.tensor(counts, dtype=torch.int64)
        order = None  # rows arrive grouped in `experts` order; the stack wants ascending positions
        if any(a > b for a, b in itertools.pairwise(positions)):
            starts = [0, *itertools.accumulate(counts)]
            ranked = sorted(range(len(experts)), key=positions.__getitem__)
            order = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in ranked]).to(self.device)
            rows, weights = rows[order], weights[order]
        with torch.no_grad():
            out = ops.grouped_swiglu(
                rows, counts_E.to(self.device), stack.gate_up_E2FD, stack.down_EDF, weights
            )
        if order is not None:
            out = torch.empty_like(out).index_copy_(0, order, out)
        with self._lock:
            for expert, count in zip(experts, counts, strict=True):
                self.tokens[(layer, expert)] += count
        return out.to("cpu", rows_ND.dtype)
