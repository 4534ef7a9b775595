"""Data: byte and Hugging Face tokenizers, text / directory / JSONL sources, memory-mapped shards written by
`dsv3 tokenize`, packed windows in a seeded order, per-rank slices that tile the global batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.cli import main as dsv3_main
from dsv3.corpus import read_shard, write_shard
from dsv3.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_stream
from dsv3.trainer.data import PackedSequences

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "import os\nprint(os.sep)\n"]


@pytest.fixture
def hf_tokenizer_file(tmp_path: Path) -> Path:
    """A real BPE tokenizer.json, trained here with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator(TEXT * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([*tok.encode("λx"), tok.eos_id]) == "λx"


def test_hf_tokenizer_file_encodes_and_names_its_eos(hf_tokenizer_file: Path) -> None:
    tok = load_tokenizer(hf_tokenizer_file)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 300
    ids = tok.encode(TEXT[0])
    assert len(ids) < len(TEXT[0])  # merges learned: fewer tokens than bytes
    assert tok.decode(ids) == TEXT[0]
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")


def test_a_broken_tokenizer_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer: cannot read"):
        HFTokenizer(bad)


def test_jsonl_directory_and_text_sources_give_documents_with_eos(tmp_path: Path) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXT)) + "\n")
    folder = tmp_path / "dir"
    folder.mkdir()
    for i, t in enumerate(TEXT):
        (folder / f"{i}.py").write_text(t)
    tok = ByteTokenizer()
    expected = np.asarray([i for t in TEXT for i in [*tok.encode(t), tok.eos_id]])
    assert np.array_equal(token_stream(str(jsonl), tok), expected)
    assert np.array_equal(token_stream(str(folder), tok), expected)
    assert np.array_equal(token_stream(str(folder / "0.py"), tok), expected[: len(TEXT[0]) + 1])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no string field 'text'"):
        token_stream(str(tmp_path / "bad.jsonl"), tok)


def test_dsv3_tokenize_writes_a_shard_the_trainer_memory_maps(tmp_path: Path, hf_tokenizer_file) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXT))
    shard = tmp_path / "docs.tok"
    argv = ["tokenize", str(jsonl), str(shard), "--tokenizer", str(hf_tokenizer_file), "--field", "content"]
    assert dsv3_main(argv) == 0
    tokens = token_stream(str(shard), ByteTokenizer())  # a shard is read as is, whatever the tokenizer
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype("<u2")
    tok = load_tokenizer(hf_tokenizer_file)
    assert np.array_equal(tokens, token_stream(str(jsonl), tok, "content"))
    (tmp_path / "short.tok").write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="size does not match its header"):
        read_shard(tmp_path / "short.tok")
    big = write_shard(tmp_path / "big.tok", np.array([70000, 1]), vocab_size=100000)
    assert read_shard(big).dtype == np.dtype("<u4") and read_shard(big).tolist() == [70000, 1]


def test_rank_slices_tile_the_global_batch_in_a_seeded_order() -> None:
    tokens = np.arange(4000) % 250
    data = PackedSequences(tokens, seq_len=10, seed=3, held_out=0.1, vocab_size=256)
    assert (data.num_train, data.num_held_out) == (360, 40)
    whole = data.batch(consumed=16, batch=8, rank=0, world=1)
    halves = [data.batch(16, 8, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat(halves), whole)
    again = PackedSequences(tokens, seq_len=10, seed=3, held_out=0.1, vocab_size=256)
    assert torch.equal(again.batch(16, 8, 0, 1), whole)  # a resumed run sees the same batch
    other = PackedSequences(tokens, seq_len=10, seed=4, held_out=0.1, vocab_size=256)
    assert not torch.equal(other.batch(16, 8, 0, 1), whole)
    # One epoch visits every training window once; held-out windows never appear in training.
    epoch = torch.stack([data.sequence(p) for p in range(360)])
    assert sorted(epoch[:, 0].tolist()) == sorted((np.arange(360) * 10 % 250).tolist())
    held = data.held_out_batch(40, rank=1, world=2)
    assert held.shape == (20, 10) and int(held[0, 0]) == (380 * 10) % 250


def test_tokens_beyond_the_model_vocabulary_are_refused() -> None:
    data = PackedSequences(np.full(100, 300), seq_len=10, seed=0, held_out=0.0, vocab_size=258)
    with pytest.raises(ValueError, match="token id 300 >= the model's vocab_size 258"):
        data.batch(0, 2, 0, 1)
    with pytest.raises(ValueError, match="no training sequence"):
        PackedSequences(np.arange(5), seq_len=10, seed=0, held_out=0.0, vocab_size=258)
