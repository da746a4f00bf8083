"""`respec prepare`: a loadable policy and EAGLE head in Hugging Face layout, a report, and
phases skipped when their outputs exist (tiny step counts: structure, not quality)."""

from __future__ import annotations

import json

import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import EagleHead
from respec.engine.tokenizer import load_tokenizer
from respec.prepare import prepare


def test_prepare_writes_policy_head_and_report_and_skips_what_exists(tmp_path):
    torch.set_num_threads(1)
    report = prepare(tmp_path / "tiny", sft_steps=4, eagle_steps=3, head_sequences=64)
    policy = load_model(tmp_path / "tiny" / "policy")
    assert load_tokenizer(tmp_path / "tiny" / "policy").vocab_size <= policy.config.vocab_size
    EagleHead.load(tmp_path / "tiny" / "eagle", policy)
    assert report["policy"]["steps"] == 4 and report["eagle"]["steps"] == 3
    assert report["eagle"]["kl_last"] < report["eagle"]["kl_first"]  # the head learns from the policy
    assert 1.0 <= report["eagle"]["accept_len_s4"] <= 5.0
    assert json.loads((tmp_path / "tiny" / "prepare.json").read_text()) == report
    weights = (tmp_path / "tiny" / "policy" / "model.safetensors").stat().st_mtime_ns
    assert prepare(tmp_path / "tiny", sft_steps=4, eagle_steps=3, head_sequences=64) == report  # nothing retrained
    assert (tmp_path / "tiny" / "policy" / "model.safetensors").stat().st_mtime_ns == weights
