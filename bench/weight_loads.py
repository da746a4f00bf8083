"""How long FastRollouts took to load each policy version in a run, from its log.

    python3 bench/weight_loads.py LOG.jsonl METRICS.jsonl

A run's `log.jsonl` has a `policy_weights_loaded` event per version (since dcb407e with
`load_s`, the handler's time, and `waited_s`, from the trainer's send to the handler's
start) and `metrics.jsonl` has the trainer's report of each version (its `time_s`, after
the publish). For logs from before dcb407e the load time is inferred: from the later of
the trainer's report and the generator's previous event (a batch or a load; a handler
runs between batches) to the loaded event. Either way the script prints the distribution
and how many slow loads (over 40 ms) ended within 15 ms of a trainer report, which is
what a copy stuck behind the trainer's next update looks like.
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

SLOW_S = 0.04
NEAR_S = 0.015


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _seconds(event: dict, start: float) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp() - start


def loads(log: Path, metrics: Path) -> list[dict]:
    """One row per loaded version: seconds it took, and the gap to the next trainer report."""
    events = _events(log)
    started = [e for e in events if e.get("event") == "run_started"]
    if not started:
        sys.exit(f"{log}: no run_started event; give a run's whole log.jsonl")
    start = _seconds(started[0], 0.0)
    reports = {r["step"]: r["time_s"] for r in _events(metrics)
               if r.get("source", "").startswith("trainer") and "reward_mean" in r}
    generator = [(_seconds(e, start), e) for e in events if e["event"] in ("batch_generated", "policy_weights_loaded")]
    rows = []
    for index, (at, event) in enumerate(generator):
        if event["event"] != "policy_weights_loaded" or event["version"] not in reports:
            continue
        published = reports[event["version"]]
        previous = generator[index - 1][0] if index else published
        took = event.get("load_s")
        if took is None:  # before dcb407e: inferred
            took = at - max(previous, published)
        later = [t for t in reports.values() if t >= at - NEAR_S]
        rows.append({"version": event["version"], "load_s": took, "waited_s": event.get("waited_s"),
                     "next_report_s": (min(later) - at) if later else None})
    return rows


def summary(rows: list[dict]) -> dict:
    if not rows:
        sys.exit("no policy_weights_loaded event with a matching trainer report in this run")
    took = sorted(r["load_s"] for r in rows)
    slow = [r for r in rows if r["load_s"] > SLOW_S]
    return {"loads": len(rows), "median_s": statistics.median(took), "p90_s": took[int(0.9 * (len(took) - 1))],
            "max_s": took[-1], "slow": len(slow),
            "slow_ending_at_a_trainer_report": sum(1 for r in slow if r["next_report_s"] is not None
                                                   and abs(r["next_report_s"]) <= NEAR_S)}


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(json.dumps(summary(loads(Path(sys.argv[1]), Path(sys.argv[2]))), indent=1))


if __name__ == "__main__":
    main()
