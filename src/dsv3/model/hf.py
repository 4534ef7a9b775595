"""Read and write Hugging Face / DeepSeek release checkpoints (`config.json` + `*.safetensors`).

Loading builds the model on the meta device, allocates it once in the requested dtype and device,
and copies the checkpoint in tensor by tensor, so the peak is about the model plus one tensor rather
than several copies of the model. Names are translated by `hf_names`; FP8 weights are dequantized by
`hf_fp8`.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.model.config import ConfigError, ModelConfig
from dsv3.model.hf_fp8 import FP8_DTYPES, SCALE_SUFFIX, dequantize_weight, fp8_block_size
from dsv3.model.hf_names import (
    STACKED_EXPERTS,
    CheckpointFormatError,
    SharedCopy,
    Slot,
    release_slot,
    to_hf_state_dict,
)

if TYPE_CHECKING:
    from dsv3.model.transformer import DeepSeekV3

__all__ = ["CheckpointFormatError", "load_pretrained", "save_pretrained"]


class _CheckpointFiles:
    """The `*.safetensors` files of a directory and which file holds each tensor (headers only)."""

    def __init__(self, directory: Path) -> None:
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise CheckpointFormatError(f"no *.safetensors files in {directory}")
        index = directory / "model.safetensors.index.json"
        if index.exists():  # a partial download names its missing shards instead of "missing tensors"
            try:
                listed = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointFormatError(f"{index.name}: no readable weight_map ({err})") from None
            absent = sorted(str(name) for name in listed if not (directory / str(name)).is_file())
            if absent:
                raise CheckpointFormatError(f"{index.name} lists files that are not there: {absent[:8]}")
        self.holder: dict[str, Path] = {}
        for file in self.files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if name in self.holder:
                        raise CheckpointFormatError(
                            f"tensor {name} appears in more than one file ({file.name})"
                        )
                    self.holder[name] = file

    def read(self, name: str, opened: tuple[Path, Any] | None = None) -> torch.Tensor:
        """`name`'s tensor, through `opened` (file, safe_open handle) when that file holds it."""
        if opened is not None and self.holder[name] == opened[0]:
            return opened[1].get_tensor(name)
        with safe_open(self.holder[name], framework="pt") as handle:
            return handle.get_tensor(name)


class _Loader:
    """Copies release tensors into a materialised model's state and checks that it fills all of it."""

    def __init__(self, model: DeepSeekV3, files: _CheckpointFiles, block_size: int) -> None:
        self.config = model.config
        self.state = model.state_dict()
        self.files = files
        self.block_size = block_size
        self.filled: collections.Counter[str] = collections.Counter()
        self.slots: set[Slot] = set()
        self.copies: list[tuple[str, str]] = []
        self.unexpected: list[str] = []

    def load_all(self) -> None:
        for file in self.files.files:
            with safe_open(file, framework="pt") as handle:
                read = functools.partial(self.files.read, opened=(file, handle))
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if name.endswith(SCALE_SUFFIX):
                        weight = name.removesuffix(SCALE_SUFFIX)
                        if weight not in self.files.holder:
                            raise CheckpointFormatError(f"{name} has no weight {weight}")
                        continue
                    self._place(name, read)
        self._check_complete()

    def _place(self, name: str, read: Callable[[str], torch.Tensor]) -> None:
        slot = release_slot(name, self.config)
        if isinstance(slot, SharedCopy):
            self.copies.append((name, slot.source))
            return
        if slot.name not in self.state:
            self.unexpected.append(name)
            return
        tensor = read(name)
        if tensor.dtype in FP8_DTYPES:
            if name + SCALE_SUFFIX not in self.files.holder:
                raise CheckpointFormatError(f"{name} is {tensor.dtype} but {name}{SCALE_SUFFIX} is missing")
            tensor = dequantize_weight(name, tensor, read(name + SCALE_SUFFIX), self.block_size)
        destination = slot.view(self.state)
        if tuple(tensor.shape) != tuple(destination.shape):
            raise CheckpointFormatError(
                f"{name}: shape {tuple(tensor.shape)} in checkpoint, {tuple(destination.shape)} in model"
            )
        if slot in self.slots or self.filled[slot.name] + destination.numel() > self.state[slot.name].numel():
            raise CheckpointFormatError(f"{name}: fills {slot.name} a second time")
        with torch.no_grad():
            destination.copy_(tensor)
        self.slots.add(slot)
        self.filled[slot.name] += destination.numel()

    def _check_complete(self) -> None:
        missing = sorted(n for n, t in self.state.items() if self.filled[n] != t.numel())
        if self.unexpected:
            raise CheckpointFormatError(
                f"checkpoint does not match config: missing {missing[:8]}, unexpected {self.unexpected[:8]}"
            )
        for prefix in sorted({n.rsplit(".", 1)[0] for n in missing if n.endswith(STACKED_EXPERTS)}):
            gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
            if self.filled[gate_up] or self.filled[down]:  # some experts loaded, not all
                held = [
                    {Slot(gate_up, e, 0), Slot(gate_up, e, 1), Slot(down, e)} <= self.slots
                    for e in range(self.config.n_routed_experts)
                ]
                partial = [e for e, ok in enumerate(held) if not ok][:8]
                raise CheckpointFormatError(f"{prefix}: incomplete experts (missing or partial: {partial})")
        if missing:
            raise CheckpointFormatError(f"checkpoint does not match config: missing {missing[:8]}")
        for name, source in self.copies:
            # Compared in the loaded dtype: a difference that the cast erases cannot change the model.
            loaded = self.state[source]
            if not torch.equal(self.files.read(name).to(loaded.device, loaded.dtype), loaded):
                raise CheckpointFormatError(
                    f"{name} differs from {source}; dsv3 shares it between main model and MTP"
                )


def load_pretrained(
    cls: type[DeepSeekV3],
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> DeepSeekV3:
    """Build the model from `config.json` and load every `*.safetensors` file in the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"checkpoint directory not found: {directory}")
    config = ModelConfig.from_hf_config(directory / "config.json")
    block_size = fp8_block_size(json.loads((directory / "config.json").read_text()))
    files = _CheckpointFiles(directory)
    with torch.device("meta"):
        model = cls(config)
    if dtype is not None:
        model.to(dtype)  # the routing biases and rope frequencies stay float32 (see their `_apply`)
    model.to_empty(device=device)
    _Loader(model, files, block_size).load_all()
    return model


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per file, in order, each file at most `max_shard_bytes` (or one tensor)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    return shards


def _new_file_mode() -> int:
    """What `open()` would give a new file: 0o666 less the umask (safetensors writes 0o600)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_pretrained(model: DeepSeekV3, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and the tensors in release layout, sharded with an index when large.

    One file's tensors are copied out at a time (split experts and MTP copies share storage with the
    model, which safetensors refuses), so saving needs about one shard of extra memory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    tensors = to_hf_state_dict(model)
    shards = _plan_shards(tensors, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    mode = _new_file_mode()
    for file, names in zip(files, shards, strict=True):
        shard = {name: tensors[name].detach().to("cpu").contiguous().clone() for name in names}
        save_file(shard, directory / file, metadata={"format": "pt"})
        (directory / file).chmod(mode)
    if len(shards) == 1:
        return
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: file for file, names in zip(files, shards, strict=True) for name in names},
    }
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
