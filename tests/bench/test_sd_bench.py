"""`respec bench sd` runs, checks greedy outputs are unchanged by SD, and writes the keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sd_writes_rows_and_plot(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "sd.json"
    done = subprocess.run([sys.executable, "-m", "respec", "bench", "sd", "--model", str(tmp_path / "model"),
                           "--json", str(out), "--batches", "1,4", "--max-new-tokens", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {row["batch"] for row in rows} == {1, 4}
    assert all(set(row) == {"batch", "config", "tokens_per_s", "accept_len", "speedup"} for row in rows)
    baselines = [row for row in rows if row["config"] == "nosd"]
    assert len(baselines) == 2 and all(row["speedup"] == 1.0 and row["accept_len"] == 1.0 for row in baselines)
    assert any(row["accept_len"] > 1 for row in rows if row["config"] != "nosd")
    assert out.with_suffix(".png").stat().st_size > 10_000
