"""Tokenizers shared by the trainer and serving: bytes by default, or a Hugging Face `tokenizer.json`.

`ByteTokenizer` maps UTF-8 bytes to ids 0-255 (the debug flavour reserves 256/257 for BOS/EOS);
`HFTokenizer` wraps the `tokenizers` library so training and serving split text the same way.
`model_tokenizer(directory)` is what serving uses: the directory's `tokenizer.json` when it has one, with
BOS/EOS, whether to prepend BOS, and the chat template from its `tokenizer_config.json`; else bytes.
Chat templates are Jinja (as in Hugging Face releases), rendered in a sandbox; without one,
`DEFAULT_CHAT_TEMPLATE` writes one "role: content" line per message and ends with "assistant:".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dsv3.corpus import BOS, EOS, documents, read_shard, stdlib_bytes

# The documented plain default, for models without a chat template of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    add_bos: bool
    chat_template: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...


class ChatTemplateError(ValueError):
    """A chat template refused the messages (its `raise_exception`) or failed to render."""


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt as the model expects it: BOS first when the tokenizer config asks for it."""
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def render_chat(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    """The conversation as prompt text, through the tokenizer's chat template (sandboxed Jinja)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {
        "bos_token": tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
        "eos_token": tokenizer.token_text(tokenizer.eos_id),
    }
    try:
        return env.from_string(tokenizer.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from exc


class ByteTokenizer:
    """UTF-8 bytes as ids; BOS 256 and EOS 257 as in the debug flavour's vocabulary."""

    vocab_size = 258
    bos_id = BOS
    eos_id = EOS
    add_bos = False  # the default corpus is one raw byte stream: prompts start without BOS as it did
    chat_template = DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return "" if token_id >= 256 else chr(token_id)


def _token_content(value: Any) -> str | None:
    """`tokenizer_config.json` writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face fast tokenizer file (`tokenizer.json`), with the special tokens of its config.

    Without a config, EOS is the first known end-of-text token and there is no BOS.
    """

    _EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<｜end▁of▁sentence｜>", "<eos>")

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer: cannot read {self.path}: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = config or {}
        self.bos_id = self._special_id(config, "bos_token")
        eos = self._special_id(config, "eos_token")
        if eos is None:
            ids = [self._tok.token_to_id(name) for name in self._EOS_NAMES]
            eos = next((i for i in ids if i is not None), self.vocab_size - 1)
        self.eos_id = eos
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template = template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE

    def _special_id(self, config: dict[str, Any], key: str) -> int | None:
        text = _token_content(config.get(key))
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json: {key} {text!r} is not in {self.path}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""


def load_tokenizer(spec: str | Path = "byte") -> Tokenizer:
    """'byte', the path of a tokenizer.json, or a model directory holding one (with its config)."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        return model_tokenizer(path, require=True)
    config_file = path.with_name("tokenizer_config.json")
    return HFTokenizer(path, _read_config(config_file) if config_file.is_file() else None)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"tokenizer: cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer: {path} must hold a JSON object")
    return config


def model_tokenizer(directory: str | Path | None, require: bool = False) -> Tokenizer:
    """The tokenizer a model directory ships (`tokenizer.json` + `tokenizer_config.json`); else bytes."""
    if directory is None:
        return ByteTokenizer()
    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.is_file():
        if require:
            raise ValueError(f"tokenizer: {directory} has no tokenizer.json")
        return ByteTokenizer()
    config_file = directory / "tokenizer_config.json"
    return HFTokenizer(file, _read_config(config_file) if config_file.is_file() else None)


def copy_tokenizer_files(spec: str | Path, directory: str | Path) -> list[Path]:
    """Put the tokenizer a model was trained with beside it (`tokenizer.json` and, when present, its
    `tokenizer_config.json`), so serving the directory splits text the same way; bytes need no files."""
    if str(spec) == "byte":
        return []
    source = Path(spec)
    files = [source / "tokenizer.json", source / "tokenizer_config.json"] if source.is_dir() else [source]
    if not source.is_dir():
        files.append(source.with_name("tokenizer_config.json"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file, name in zip(files, ("tokenizer.json", "tokenizer_config.json"), strict=True):
        if file.is_file():
            target = directory / name
            target.write_bytes(file.read_bytes())
            written.append(target)
    return written


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
