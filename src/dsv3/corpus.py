"""A training corpus present on every machine (the Python standard library's own source, as bytes), the
text sources a trainer reads (files, directories, JSONL) and the memory-mapped pre-tokenized shard format.

Tokens are bytes (0-255); the debug flavour reserves 256 for BOS and 257 for EOS.
"""

from __future__ import annotations

import json
import struct
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


# ---- sources and the pre-tokenized shard format ----------------------------------------------------
SHARD_MAGIC = b"DSV3TOK1"
_SHARD_HEADER = 24  # magic, uint32 bytes per token (2 or 4), uint32 0, uint64 token count


def documents(path: str | Path, field: str = "text") -> Iterator[str]:
    """Texts of a source: a text file, a directory (every file, sorted, recursively), or JSONL (`field`)."""
    path = Path(path)
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            yield from documents(child, field)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{path}:{number}: no string field {field!r}")
                yield record[field]
    else:
        yield path.read_bytes().decode("utf-8", errors="replace")


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write a token stream as a shard (uint16 ids when the vocabulary fits, else uint32)."""
    width = 2 if vocab_size <= 1 << 16 else 4
    data = np.ascontiguousarray(tokens, dtype=np.uint16 if width == 2 else np.uint32)
    path = Path(path)
    with path.open("wb") as out:
        out.write(SHARD_MAGIC + struct.pack("<IIQ", width, 0, len(data)))
        out.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
    return path


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard written by `write_shard` (`dsv3 tokenize`); nothing is read until used."""
    path = Path(path)
    with path.open("rb") as handle:
        header = handle.read(_SHARD_HEADER)
    if len(header) < _SHARD_HEADER or header[:8] != SHARD_MAGIC:
        raise ValueError(f"{path}: not a dsv3 token shard (bad magic)")
    width, _, count = struct.unpack("<IIQ", header[8:])
    if width not in (2, 4):
        raise ValueError(f"{path}: token width {width} (expected 2 or 4)")
    if path.stat().st_size != _SHARD_HEADER + width * count:
        raise ValueError(f"{path}: size does not match its header ({count} tokens of {width} bytes)")
    dtype = np.dtype("<u2" if width == 2 else "<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=_SHARD_HEADER, shape=(count,))
