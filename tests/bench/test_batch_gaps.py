"""bench/batch_gaps.py: the time between FastRollouts' batches, and the loads within it."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from batch_gaps import gaps, summary  # noqa: E402

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


def test_nothing_left_after_the_skipped_batches_is_an_error():
    rows = gaps([_event(1.0, "batch_generated", seconds=0.5), _event(2.0, "batch_generated", seconds=0.5)])
    with pytest.raises(SystemExit, match="no batches"):
        summary(rows, skip=5)
