"""Where FastRollouts' time goes between its batches, from a run's log.

    python3 bench/batch_gaps.py LOG.jsonl [LOG.jsonl ...]

(`respec bench e2e` also puts these medians in its table and JSON for every variant that
generates through FastRollouts: `run_gaps(log_lines)`.)

A batch's `batch_generated` event comes at its end, with its `seconds`, so it started
`seconds` before. The gap from one batch's end to the next one's start is time the GPU
did not generate: weights loading (`policy_weights_loaded` and `draft_weights_loaded`,
with `load_s` since dcb407e and abbcbb8), the event loop handling other actors' messages
(in the usual graphs the PromptSource and RewardScorer share it), and waiting for prompts
or a newer policy. The log may be a run's whole `log.jsonl` or only those three events
(grep them out: a 100-step GPU run's log is too large to copy back whole). Prints, per log,
JSON with the medians over the batches after the first `--skip` (default 5: graph captures
and step-cost timing come first).
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime
from pathlib import Path

EVENTS = ("batch_generated", "policy_weights_loaded", "draft_weights_loaded")


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def gaps(events: list[dict]) -> list[dict]:
    """One row per batch after the first: its seconds, the gap before it, and the loads
    that ended within that gap."""
    rows, end, loads = [], None, []
    for event in events:
        kind = event.get("event")
        if kind in ("policy_weights_loaded", "draft_weights_loaded"):
            loads.append(event)
        elif kind == "batch_generated":
            start = _at(event) - event["seconds"]
            if end is not None:
                rows.append({"batch_s": event["seconds"], "gap_s": start - end, "steps": event.get("steps"),
                             "policy_load_s": sum(e.get("load_s", 0.0) for e in loads
                                                  if e["event"] == "policy_weights_loaded"),
                             "draft_load_s": sum(e.get("load_s", 0.0) for e in loads
                                                 if e["event"] == "draft_weights_loaded"),
                             "draft_kinds": sorted({e.get("kind", "?") for e in loads
                                                    if e["event"] == "draft_weights_loaded"})})
            end, loads = _at(event), []
    return rows


def summary(rows: list[dict], skip: int) -> dict | None:
    """Medians over the batches after the first `skip` (None: no batches after them)."""
    rows = rows[skip:]
    if not rows:
        return None
    with_head = [r for r in rows if r["draft_kinds"]]
    median = lambda key, of: round(statistics.median(r[key] for r in of), 4) if of else None  # noqa: E731
    return {"batches": len(rows), "batch_s": median("batch_s", rows), "gap_s": median("gap_s", rows),
            "policy_load_s": median("policy_load_s", rows),
            "gaps_with_a_head_load": len(with_head), "gap_s_with_a_head_load": median("gap_s", with_head),
            "draft_load_s": median("draft_load_s", with_head),
            "draft_kinds": sorted({k for r in with_head for k in r["draft_kinds"]}), **slow_batches(rows)}


SLOW = 1.5  # a batch this many times the median batch counts as slow


def slow_batches(rows: list[dict]) -> dict:
    """Why the slow batches were slow, where the log has each batch's steps (4acc087
    on): more steps (a longer row: the long tail) or longer steps (the host late to launch
    the next one: the GIL, a pause). Medians of steps and ms per step, over all batches and
    over those past SLOW x the median batch; {} for a log without steps."""
    timed = [r for r in rows if r.get("steps")]
    if not timed:
        return {}
    typical = statistics.median(r["batch_s"] for r in timed)
    slow = [r for r in timed if r["batch_s"] > SLOW * typical]

    def medians(of: list[dict]) -> tuple[float | None, float | None]:
        if not of:
            return None, None
        return (statistics.median(r["steps"] for r in of),
                round(statistics.median(1e3 * r["batch_s"] / r["steps"] for r in of), 3))

    (steps, ms), (slow_steps, slow_ms) = medians(timed), medians(slow)
    return {"steps": steps, "ms_per_step": ms, "slow_batches": len(slow), "slow_steps": slow_steps,
            "slow_ms_per_step": slow_ms}


def events_in(lines: list[str]) -> list[dict]:
    """A log's batch and load events, in order (other lines are not parsed: a 100-step GPU
    run's log is tens of MB)."""
    wanted = tuple(f'"{name}"' for name in EVENTS)
    chosen = (line for line in lines if any(name in line for name in wanted))
    return [event for event in map(json.loads, chosen) if event.get("event") in EVENTS]


def log_events(path: Path) -> list[dict]:
    return events_in(path.read_text().splitlines())


def run_gaps(log_lines: list[str], skip: int = 5) -> dict | None:
    """`summary` of a run's log lines (None: no FastRollouts batches past `skip`)."""
    return summary(gaps(events_in(log_lines)), skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--skip", type=int, default=5)
    args = parser.parse_args()
    for path in args.logs:
        medians = summary(gaps(log_events(path)), args.skip)
        if medians is None:
            raise SystemExit(f"{path}: no batches after the first {args.skip}")
        print(json.dumps({"log": str(path), **medians}))


if __name__ == "__main__":
    main()
