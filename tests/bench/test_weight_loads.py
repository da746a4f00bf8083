"""bench/weight_loads.py: a run's policy loads, as logged (load_s) or inferred from the
events around them (logs from before the field)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from weight_loads import loads, summary  # noqa: E402

T0 = 1_800_000_000.0


def _event(seconds: float, event: str, **fields) -> dict:
    stamp = datetime.fromtimestamp(T0 + seconds, tz=UTC).isoformat().replace("+00:00", "Z")
    return {"event": event, "timestamp": stamp, **fields}


def _write(tmp_path: Path, events: list[dict], reports: dict[int, float]) -> tuple[Path, Path]:
    log, metrics = tmp_path / "log.jsonl", tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in events))
    metrics.write_text("\n".join(json.dumps({"step": v, "source": "trainer/0", "time_s": t, "reward_mean": 0.0})
                                 for v, t in reports.items()))
    return log, metrics


def test_inferred_loads_start_at_the_later_of_the_publish_and_the_previous_batch(tmp_path):
    events = [_event(0.0, "run_started"),
              _event(1.00, "batch_generated"), _event(1.02, "policy_weights_loaded", version=1),  # published at 1.005
              _event(1.20, "batch_generated"), _event(1.50, "policy_weights_loaded", version=2)]  # stuck until 1.50
    log, metrics = _write(tmp_path, events, {1: 1.005, 2: 1.10, 3: 1.49})
    rows = loads(log, metrics)
    assert [r["load_s"] for r in rows] == pytest.approx([0.015, 0.30], abs=1e-4)
    assert summary(rows)["slow"] == 1 and summary(rows)["slow_ending_at_a_trainer_report"] == 1  # v3's at 1.49


def test_logged_load_times_are_taken_as_they_are(tmp_path):
    events = [_event(0.0, "run_started"), _event(1.0, "batch_generated"),
              _event(1.5, "policy_weights_loaded", version=1, load_s=0.011, waited_s=0.002)]
    log, metrics = _write(tmp_path, events, {1: 0.9})
    (row,) = loads(log, metrics)
    assert row["load_s"] == 0.011 and row["waited_s"] == 0.002
