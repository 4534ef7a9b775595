"""A training corpus present on every machine: the Python standard library's own source, as bytes.

Tokens are bytes (0-255); the debug flavour reserves 256 for BOS and 257 for EOS.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

BOS, EOS = 256, 257


def stdlib_bytes(max_bytes: int = 8 << 20) -> bytes:
    """Concatenated `.py` files of the running interpreter's standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources under {root}")
    return b"\n".join(chunks)[:max_bytes]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


class ByteBatches:
    """Random windows of `seq_len` tokens from a byte corpus; the last 5% is held out for evaluation."""

    def __init__(self, data: bytes, seq_len: int, seed: int = 0) -> None:
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(len(tokens) * 0.95)
        self.train, self.held_out = tokens[:split], tokens[split:]
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch: int, held_out: bool = False) -> torch.Tensor:
        source = self.held_out if held_out else self.train
        if len(source) <= self.seq_len:
            raise ValueError(f"corpus of {len(source)} tokens is too short for windows of {self.seq_len}")
        starts = torch.randint(0, len(source) - self.seq_len, (batch,), generator=self.generator)
        return torch.stack([source[s : s + self.seq_len] for s in starts.tolist()])
