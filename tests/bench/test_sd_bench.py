"""`respec bench sd` runs, checks greedy outputs are unchanged by SD, and writes the keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import small_qwen2

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sd_writes_rows_and_plot(tmp_path):
    small_qwen2(tmp_path / "model", vocab=32)
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
