"""The shard's core, without gRPC: which (layer, expert) slots it holds, and their grouped SwiGLU.

Weights of a layer's requested experts are stacked for `ops.grouped_swiglu`; the stack is cached per
(layer, experts) since the router sends the same set step after step, and dropped when slots change.
"""

from __future__ import annotations

import collections
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


class SlotStore:
    def __init__(self, capacity: int, device: str = "cpu", cached_stacks: int = 64) -> None:
        self.capacity = capacity
        self.device = torch.device(device)
        self.held: dict[Slot, ExpertWeights] = {}
        self.sizes: tuple[int, int] | None = None  # (hidden, width) of every held slot
        self.tokens: collections.Counter[Slot] = collections.Counter()
        self._stacks: collections.OrderedDict[tuple[int, tuple[int, ...]], ExpertWeights] = (
            collections.OrderedDict()
        )
        self._cached_stacks = cached_stacks
        self._lock = threading.Lock()

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
            self._stacks.clear()
        return new

    def drop(self, slots: list[Slot]) -> list[Slot]:
        with self._lock:
            dropped = [s for s in dict.fromkeys(slots) if self.held.pop(s, None) is not None]
            self._stacks.clear()
        return dropped

    def take_tokens(self) -> dict[Slot, int]:
        """Rows computed per held slot since the previous call (0 for idle slots)."""
        with self._lock:
            out = {slot: self.tokens.get(slot, 0) for slot in sorted(self.held)}
            self.tokens.clear()
        return out

    # ---- compute --------------------------------------------------------------------------------
    def _stack(self, layer: int, experts: tuple[int, ...]) -> ExpertWeights:
        key = (layer, experts)
        with self._lock:
            stack = self._stacks.get(key)
            if stack is not None:
                self._stacks.move_to_end(key)
                return stack
            missing = [e for e in experts if (layer, e) not in self.held]
            if missing:
                raise SlotNotLoaded(
                    "experts", f"slot (layer {layer}, expert {missing[0]}) is not loaded here"
                )
            stack = (
                torch.stack([self.held[(layer, e)][0] for e in experts]),
                torch.stack([self.held[(layer, e)][1] for e in experts]),
            )
            self._stacks[key] = stack
            if len(self._stacks) > self._cached_stacks:
                self._stacks.popitem(last=False)
            return stack

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
        gate_up, down = self._stack(layer, tuple(experts))
        if rows_ND.shape[1] != gate_up.shape[2]:
            raise SlotError(
                "rows", f"hidden size {rows_ND.shape[1]}, the experts here take {gate_up.shape[2]}"
            )
        rows = rows_ND.to(self.device, gate_up.dtype)
        counts_E = torch.tensor(counts, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            out = ops.grouped_swiglu(rows, counts_E, gate_up, down, weights_N.to(self.device, torch.float32))
        with self._lock:
            for expert, count in zip(experts, counts, strict=True):
                self.tokens[(layer, expert)] += count
        return out.to("cpu", rows_ND.dtype)
