"""Tokenizers shared by the trainer and serving: bytes by default, or a Hugging Face `tokenizer.json`.

`ByteTokenizer` maps UTF-8 bytes to ids 0-255 (the debug flavour reserves 256/257 for BOS/EOS);
`HFTokenizer` wraps the `tokenizers` library so training and serving split text the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from dsv3.corpus import BOS, EOS, documents, read_shard, stdlib_bytes


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids; BOS 256 and EOS 257 as in the debug flavour's vocabulary."""

    vocab_size = 258
    bos_id = BOS
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer file (`tokenizer.json`); EOS is the first known end-of-text token."""

    _EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>", "<eos>")

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer: cannot read {self.path}: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(name) for name in self._EOS_NAMES]
        self.eos_id = next((i for i in ids if i is not None), self.vocab_size - 1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(spec: str | Path = "byte") -> Tokenizer:
    """'byte' or the path of a tokenizer.json."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def token_stream(data: str, tokenizer: Tokenizer, field: str = "text") -> np.ndarray:
    """All tokens of the source: documents encoded and each followed by EOS; shards are memory-mapped."""
    if data.endswith(".tok"):
        return read_shard(data)
    if not data:  # the default corpus: the standard library's source, one byte stream
        raw = stdlib_bytes()
        if isinstance(tokenizer, ByteTokenizer):
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        return np.asarray(tokenizer.encode(raw.decode("utf-8", errors="replace")), dtype=np.int32)
    ids: list[int] = []
    for text in documents(data, field):
        ids += tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int32)
