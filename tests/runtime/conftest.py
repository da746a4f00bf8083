from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml

from respec.engine.tokenizer import char_tokenizer
from respec.runtime.launcher import RunResult, run_file


@pytest.fixture
def run_graph(tmp_path: Path):
    """Write a run file into tmp_path and run it; returns the RunResult."""

    def run(actors: dict[str, Any], name: str = "t", **run_keys: Any) -> RunResult:
        config = {"run": {"name": name, "runs_dir": str(tmp_path / "runs"), "timeout_s": 120,
                          **run_keys}, "actors": actors}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return run_file(path, progress=False)

    return run


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random Qwen2 policy (2 layers, hidden 32) with the built-in tokenizer, saved."""
    directory = tmp_path_factory.mktemp("policy")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory
