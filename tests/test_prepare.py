"""`respec prepare`: a loadable policy and EAGLE head in Hugging Face layout, a report, and
phases skipped when their outputs exist (tiny step counts: structure, not quality)."""

from __future__ import annotations

import json

import pytest
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


def test_prepare_trains_on_another_task_and_reports_the_layouts_the_head_saw(tmp_path):
    torch.set_num_threads(1)
    params = {"max_value": 9, "rare_share": 0.5}
    report = prepare(tmp_path / "shift", sft_steps=4, eagle_steps=2, head_sequences=32, task_name="format_shift",
                     task_params=params)
    assert report["task"] == {"name": "format_shift", "params": params}
    shares = report["eagle"]["form_shares"]
    assert set(shares) <= {"common", "rare", "other"} and sum(shares.values()) == pytest.approx(1.0)
    assert "form_shares" not in prepare(tmp_path / "tiny", sft_steps=2, eagle_steps=1, head_sequences=8)["eagle"]


def test_head_completions_can_be_all_greedy(tmp_path):
    from respec.prepare import _policy_rows
    from respec.tasks import make_task

    torch.set_num_threads(1)
    prepare(tmp_path / "p", sft_steps=2, eagle_steps=1, head_sequences=8)
    model, tokenizer = load_model(tmp_path / "p" / "policy"), load_tokenizer(tmp_path / "p" / "policy")
    task = make_task("arithmetic")
    greedy = _policy_rows(model, tokenizer, task, 8, seed=0, sampled=0.0)
    half = _policy_rows(model, tokenizer, task, 8, seed=0, sampled=0.5)
    assert len(greedy) == 8 and greedy[4:] == half[4:]  # the greedy half is the same either way
    assert greedy[:4] == _policy_rows(model, tokenizer, task, 4, seed=0, sampled=0.0)  # no sampling: no seed
