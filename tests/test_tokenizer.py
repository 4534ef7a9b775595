"""Serving's tokenizers: a model directory's tokenizer.json with the special tokens and chat template of its
tokenizer_config.json, the byte-level default, and the documented plain chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    ByteTokenizer,
    ChatTemplateError,
    HFTokenizer,
    copy_tokenizer_files,
    encode_prompt,
    load_tokenizer,
    model_tokenizer,
    render_chat,
)

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + m['role']) }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory as a release ships it: a BPE tokenizer.json trained here, and its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "hello world, hello there"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_model_directory_tokenizer_takes_special_tokens_and_template_from_its_config(model_dir) -> None:
    tok = model_tokenizer(model_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (tok._tok.token_to_id("<s>"), tok._tok.token_to_id("</s>"))
    ids = encode_prompt(tok, "hello world")
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "hello world"
    assert encode_prompt(tok, "<s>hello")[:2] != [tok.bos_id, tok.bos_id]  # never a second BOS
    text = render_chat(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"
    ids = encode_prompt(tok, text)
    assert tok._tok.token_to_id("<|assistant|>") == ids[-1]  # special tokens in the text stay single ids
    assert ids.count(tok.eos_id) == 2
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        render_chat(tok, [{"role": "tool", "content": "x"}])
    assert isinstance(load_tokenizer(model_dir), HFTokenizer)  # the trainer's spec accepts a directory


def test_without_tokenizer_json_serving_uses_bytes_and_the_plain_template(tmp_path: Path) -> None:
    tok = model_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert encode_prompt(tok, "é") == [0xC3, 0xA9]  # no BOS: the default corpus has none
    text = render_chat(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    assert text == "user: 2+2?\nassistant: 4\nassistant:"
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        model_tokenizer(tmp_path, require=True)


def test_a_config_naming_an_unknown_special_token_is_an_error(model_dir) -> None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' is not in"):
        model_tokenizer(model_dir)
    (model_dir / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        model_tokenizer(model_dir)


def test_an_exported_model_directory_carries_the_training_tokenizer(model_dir, tmp_path: Path) -> None:
    export = tmp_path / "export"
    written = copy_tokenizer_files(model_dir / "tokenizer.json", export)
    assert [p.name for p in written] == ["tokenizer.json", "tokenizer_config.json"]
    served, trained = model_tokenizer(export), load_tokenizer(model_dir / "tokenizer.json")
    assert served.encode("hello there") == trained.encode("hello there")
    assert (served.bos_id, served.eos_id, served.chat_template) == (trained.bos_id, trained.eos_id, TEMPLATE)
    assert copy_tokenizer_files("byte", tmp_path / "bytes") == []
