"""Reading one expert's weights by release name: from a Hugging Face directory or the checkpoint service.

Only the requested experts' tensors are read: safetensors headers say which file holds which tensor,
and `safe_open` reads a tensor (or one expert's slice of transformers' fused stacks) on its own. FP8
release weights are dequantized with the core's `hf_fp8`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from dsv3.model.hf_fp8 import FP8_DTYPES, SCALE_SUFFIX, dequantize_weight, fp8_block_size

# (layer, expert) -> (gate_up [2F, D], down [D, F]) in float32 on the CPU
ExpertWeights = tuple[torch.Tensor, torch.Tensor]
Reader = Callable[[list[tuple[int, int]]], dict[tuple[int, int], ExpertWeights]]


class WeightSourceError(ValueError):
    """The weight source cannot provide a slot (missing directory, tensor or checkpoint)."""


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Release names of one expert's gate, up and down projections."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    return prefix + "gate_proj.weight", prefix + "up_proj.weight", prefix + "down_proj.weight"


class HfDirectory:
    """A Hugging Face / DeepSeek release directory, indexed by which file holds each tensor (headers)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise WeightSourceError(f"hf_directory.path: no directory {self.directory}")
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise WeightSourceError(f"hf_directory.path: no *.safetensors in {self.directory}")
        config = self.directory / "config.json"
        self.block_size = fp8_block_size(json.loads(config.read_text())) if config.exists() else (128, 128)
        self.holder: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self.holder[name] = file

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(self.holder[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
        if tensor.dtype in FP8_DTYPES:
            if name + SCALE_SUFFIX not in self.holder:
                raise WeightSourceError(f"{name} is {tensor.dtype} but {name}{SCALE_SUFFIX} is missing")
            tensor = dequantize_weight(name, tensor, self._read(name + SCALE_SUFFIX), self.block_size)
        return tensor.float()

    def _fused(self, layer: int, expert: int) -> ExpertWeights | None:
        """transformers' stacked names (`mlp.experts.gate_up_proj` [E, 2F, D]): read one expert's slice."""
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = prefix + "gate_up_proj", prefix + "down_proj"
        if gate_up not in self.holder or down not in self.holder:
            return None
        out = []
        for name in (gate_up, down):
            with safe_open(self.holder[name], framework="pt") as handle:
                part = handle.get_slice(name)
                if expert >= part.get_shape()[0]:
                    raise WeightSourceError(
                        f"{name} holds {part.get_shape()[0]} experts, not expert {expert}"
                    )
                out.append(part[expert : expert + 1][0].float())
        return out[0], out[1]

    def read(self, slots: list[tuple[int, int]]) -> dict[tuple[int, int], ExpertWeights]:
        out: dict[tuple[int, int], ExpertWeights] = {}
        for layer, expert in slots:
            names = expert_names(layer, expert)
            if all(n in self.holder for n in names):
                gate, up, down = (self._read(n) for n in names)
                out[(layer, expert)] = torch.cat((gate, up)), down
                continue
            fused = self._fused(layer, expert)
            if fused is None:
                raise WeightSourceError(
                    f"hf_directory: {self.directory} has no tensors of (layer {layer}, expert {expert}) "
                    f"(looked for {names[0]})"
                )
            out[(layer, expert)] = fused
        return out


def checkpoint_reader(address: str | None, job: str, step: int | None) -> Reader:
    """Loads exactly the slots' tensors (by release name) from the checkpoint service at `address`."""
    if not address:
        raise WeightSourceError("checkpoint: this shard was started without --checkpoint ADDRESS")
    if not job:
        raise WeightSourceError("checkpoint.job: must not be empty")

    def read(slots: list[tuple[int, int]]) -> dict[tuple[int, int], ExpertWeights]:
        from dsv3.checkpoint import CheckpointClient

        names = [n for slot in slots for n in expert_names(*slot)]
        with CheckpointClient(address, retries=2, backoff_seconds=0.1) as client:
            loaded = client.load(job, step, names=names)
        out: dict[tuple[int, int], ExpertWeights] = {}
        for slot in slots:
            gate, up, down = expert_names(*slot)
            missing = [n for n in (gate, up, down) if n not in loaded]
            if missing:
                raise WeightSourceError(f"checkpoint {job}: missing {missing[0]}")
            out[slot] = torch.cat((loaded[gate].float(), loaded[up].float())), loaded[down].float()
        return out

    return read
