"""`respec bench runtime` runs end to end and writes the documented keys (numbers are for the
benchmark itself to report, not for a timed test to assert)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runtime_writes_every_key(tmp_path):
    out = tmp_path / "runtime.json"
    done = subprocess.run([sys.executable, "-m", "respec", "bench", "runtime", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for key in ("rtt_p50_us", "raw_rtt_p50_us", "overhead_ratio"):
        assert set(results[key]) == {"inproc", "ipc", "tcp"}
        assert all(value > 0 for value in results[key].values())
    for transport in ("inproc", "ipc", "tcp"):  # the ratio is of the two numbers in this run
        ratio = results["rtt_p50_us"][transport] / results["raw_rtt_p50_us"][transport]
        assert abs(ratio - results["overhead_ratio"][transport]) <= 0.005 + 1e-9
    assert results["msgs_per_s"] > 0 and results["tensor_64mib_ms"] > 0 and results["memcpy_64mib_ms"] > 0
    assert "respec bench runtime" in done.stdout
