"""The step times inside a `respec bench e2e` JSON: per run, the mean and the median
step after the first, each against the same seed's sync no-SD run, the slowest steps, and
the trainer's median update and publish, and where the runs' logs had each batch's steps
(4acc087 on), how many batches took over 1.5x the median and whether they ran more steps
or slower ones. For files written before the e2e table had the median column
(docs/PERFORMANCE.md quotes these).

    python3 bench/e2e_steps.py docs/results/e2e_gains_wide_2gpu_h100_8769895.json [...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec.bench.rl_runs import step_intervals, trainer_cycle  # noqa: E402


def run_steps(name: str, run: dict) -> dict:
    intervals = step_intervals(run["trainer"])
    slowest = sorted(((gap, step + 2) for step, gap in enumerate(intervals)), reverse=True)[:3]
    cycle = trainer_cycle(run["trainer"]) or {"update_s": 0.0, "publish_s": 0.0}
    gaps = (run.get("extra") or {}).get("batch_gaps") or {}
    slow = "-"
    if "steps" in gaps:
        typical = f"all: {gaps['steps']} steps of {gaps['ms_per_step']} ms"
        slow = (f"{gaps['slow_batches']}: {gaps['slow_steps']} steps of {gaps['slow_ms_per_step']} ms ({typical})"
                if gaps["slow_batches"] else f"0 ({typical})")
    return {"run": name, "seed": run.get("seed"), "variant": run.get("variant", name), "slow_batches": slow,
            "mean": statistics.mean(intervals), "median": statistics.median(intervals),
            "slowest": [(round(gap, 3), step) for gap, step in slowest],
            "update": cycle["update_s"], "publish": cycle["publish_s"]}


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    for path in paths:
        runs = [run_steps(name, run) for name, run in json.loads(Path(path).read_text())["variants"].items()]
        base = {r["seed"]: r for r in runs if r["variant"] == "sync_nosd"}
        print(f"{path}\n| run | mean step s (x sync) | median step s (x sync) | slowest (s, step) | trainer update / publish s "
              "| slow batches (logs from 4acc087) |\n| --- | --- | --- | --- | --- | --- |")
        for r in runs:
            print(f"| {r['run']} | {_against(r, base, 'mean')} | {_against(r, base, 'median')} | "
                  f"{r['slowest']} | {r['update']:.3f} / {r['publish']:.3f} | {r['slow_batches']} |")


def _against(run: dict, base: dict, key: str) -> str:
    sync = base.get(run["seed"])
    return f"{run[key]:.3f}" + (f" ({run[key] / sync[key]:.2f}x)" if sync else "")


if __name__ == "__main__":
    main(sys.argv[1:])
