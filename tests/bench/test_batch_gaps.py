"""respec/bench/batch_gaps.py: the time between FastRollouts' batches, and the loads within it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from respec.bench.batch_gaps import gaps, log_events, run_gaps, summary

T0 = 1_800_000_000.0


def _event(at: float, event: str, **fields) -> dict:
    stamp = datetime.fromtimestamp(T0 + at, tz=UTC).isoformat().replace("+00:00", "Z")
    return {"event": event, "timestamp": stamp, **fields}


def test_a_gap_runs_from_a_batchs_end_to_the_next_ones_start_with_the_loads_in_it():
    events = [_event(1.00, "batch_generated", seconds=0.9),
              _event(1.01, "policy_weights_loaded", version=1, load_s=0.01),
              _event(1.20, "batch_generated", seconds=0.15),  # started at 1.05: a gap of 0.05
              _event(1.22, "policy_weights_loaded", version=2, load_s=0.012),
              _event(1.26, "draft_weights_loaded", version=1, kind="file", load_s=0.04),
              _event(1.45, "batch_generated", seconds=0.15)]  # started at 1.30: a gap of 0.10
    rows = gaps(events)
    assert [r["gap_s"] for r in rows] == pytest.approx([0.05, 0.10], abs=1e-4)
    assert [r["policy_load_s"] for r in rows] == pytest.approx([0.01, 0.012])
    assert [r["draft_kinds"] for r in rows] == [[], ["file"]]
    result = summary(rows, skip=0)
    assert result["batches"] == 2 and result["gaps_with_a_head_load"] == 1
    assert result["gap_s_with_a_head_load"] == pytest.approx(0.10) and result["draft_load_s"] == pytest.approx(0.04)


def test_nothing_left_after_the_skipped_batches_is_none():
    rows = gaps([_event(1.0, "batch_generated", seconds=0.5), _event(2.0, "batch_generated", seconds=0.5)])
    assert summary(rows, skip=5) is None


def test_a_run_directorys_log_is_read_for_its_batch_and_load_events_only(tmp_path):
    events = [_event(0.5, "run_started"), _event(1.00, "batch_generated", seconds=0.9),
              _event(1.01, "policy_weights_loaded", version=1, load_s=0.01),
              _event(1.02, "rollout_sent", note='mentions "batch_generated" in a field'),
              _event(1.20, "batch_generated", seconds=0.15)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    assert [e["event"] for e in log_events(tmp_path / "log.jsonl")] == [
        "batch_generated", "policy_weights_loaded", "batch_generated"]
    medians = run_gaps((tmp_path / "log.jsonl").read_text().splitlines(), skip=0)
    assert medians["batches"] == 1 and medians["gap_s"] == pytest.approx(0.05)
    assert medians["policy_load_s"] == pytest.approx(0.01)
    assert run_gaps([]) is None  # no log: a run that generated elsewhere


def test_slow_batches_are_told_apart_by_their_steps_and_their_time_per_step():
    """Over 1.5x the median batch: a long tail (more steps of the usual length) or a stalled
    host (the usual steps, each longer); a log without steps gives nothing to tell."""
    at, events = 0.0, []
    for seconds, steps in [(0.10, 50)] * 6 + [(0.20, 100), (0.30, 50)]:
        at += seconds + 0.05
        events.append(_event(at, "batch_generated", seconds=seconds, steps=steps))
    result = summary(gaps(events), skip=0)
    assert result["steps"] == 50 and result["ms_per_step"] == pytest.approx(2.0)
    assert result["slow_batches"] == 2 and result["slow_steps"] == 75
    assert result["slow_ms_per_step"] == pytest.approx((2.0 + 6.0) / 2)
    without = summary(gaps([_event(1.0, "batch_generated", seconds=0.1), _event(1.2, "batch_generated", seconds=0.1)]),
                      skip=0)
    assert "steps" not in without
