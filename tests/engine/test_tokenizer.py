"""The built-in character tokenizer, loading tokenizers from directories, and the check
that a tokenizer fits a model."""

from __future__ import annotations

import json
import random
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from respec.engine.config import ModelConfig
from respec.engine.errors import CheckpointError, TokenizerMismatchError
from respec.engine.tokenizer import (
    CHAR_VOCABULARY,
    char_tokenizer,
    check_tokenizer_matches,
    load_tokenizer,
)
from respec.tasks.registry import make_task


def config_with_vocab(vocab_size: int, **ids) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=vocab_size, hidden_size=8, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        attention_bias=True, **ids,
    )


def test_char_tokenizer_round_trips_the_builtin_tasks():
    tokenizer, rng = char_tokenizer(), random.Random(0)
    for name in ("arithmetic", "countdown"):
        task = make_task(name)
        for _ in range(50):
            problem = task.sample(rng)
            text = problem.prompt + problem.solution + "\n"
            ids = tokenizer.encode(text)
            assert len(ids) == len(text)  # one id per character
            assert tokenizer.decode(ids) == text


def test_char_tokenizer_round_trips_500_mixed_task_texts():
    tokenizer, task, rng = char_tokenizer(), make_task("arithmetic+countdown"), random.Random(1)
    for _ in range(500):
        problem = task.sample(rng)
        for text in (problem.prompt, problem.solution, problem.prompt + problem.solution):
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_tokenizer_special_tokens():
    tokenizer = char_tokenizer()
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    ids = tokenizer.encode("1+1=2", add_bos=True) + [tokenizer.eos_id, tokenizer.pad_id]
    assert ids[0] == 1 and tokenizer.decode(ids) == "1+1=2"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>1+1=2<eos><pad>"
    assert tokenizer.vocab_size == len(CHAR_VOCABULARY) == len(set(CHAR_VOCABULARY))


def test_unknown_characters_are_named():
    with pytest.raises(ValueError, match="cannot tokenize 'é'"):
        char_tokenizer().encode("café")


def test_saved_tokenizer_loads_through_the_common_path(tmp_path):
    char_tokenizer().save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    text = "3,7,25>46:25+3*7"
    assert loaded.encode(text) == char_tokenizer().encode(text) and loaded.decode(loaded.encode(text)) == text


def test_a_hugging_face_style_directory(tmp_path):
    """Special tokens given as {"content": ...} objects (tokenizer_config.json) or strings."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "pad_token": "<unk>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    assert loaded.encode("hello world", add_bos=True) == [1, 3, 4]


def test_tokenizer_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json: tokenizer.json not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    char_tokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(CheckpointError, match=r"eos_token '<\|im_end\|>' is not in tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_must_fit_the_model_vocabulary():
    tokenizer = char_tokenizer()
    check_tokenizer_matches(tokenizer, config_with_vocab(len(CHAR_VOCABULARY)))
    check_tokenizer_matches(tokenizer, config_with_vocab(128))  # a padded embedding table is fine
    with pytest.raises(TokenizerMismatchError, match=r"tokenizer mismatch: .* ids up to 86 .* vocab_size is 40"):
        check_tokenizer_matches(tokenizer, config_with_vocab(40))
    with pytest.raises(TokenizerMismatchError, match="eos_token_id=200 >= vocab_size=128"):
        check_tokenizer_matches(tokenizer, config_with_vocab(128, eos_token_ids=(200,)))
