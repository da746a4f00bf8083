"""The run directory's files beside the trace: set-up for a fresh or resumed run, the RL
figures of summary.json, and report.png.

A fresh run replaces what a previous run of the same name left (metrics, summary, trace,
checkpoints). A resumed run (`respec run --resume`) keeps them: metrics rows after the
checkpoint's step are dropped (those steps run again), and the trace files of the earlier
attempt are kept as `trace.<group>.part<k>.msgpack` so `respec trace` sees the whole run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
# Keys an RL step row carries (PolicyTrainer) and the summary figures drawn from them.
RL_STEP_KEY = "reward_mean"
EDGE_STEPS = 3  # reward_start / reward_end average this many steps at each end


def prepare_run_dir(run_dir: Path, resume: bool) -> str:
    """Clean or keep the run directory; returns the checkpoint a resumed run continues from
    ("" for a fresh run, or a resume with nothing to resume from)."""
    from respec.rl.checkpoints import checkpoint_root, latest_checkpoint, load_meta

    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is None:
        for name in (METRICS, "summary.json", "report.png"):
            (run_dir / name).unlink(missing_ok=True)
        for stale in run_dir.glob("trace.*.msgpack"):
            stale.unlink()
        shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
        return ""
    _keep_metrics_up_to(run_dir / METRICS, load_meta(checkpoint).step)
    _set_traces_aside(run_dir)
    return checkpoint.name


def _keep_metrics_up_to(path: Path, step: int) -> None:
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows if row.get("step", 0) <= step))


def _set_traces_aside(run_dir: Path) -> None:
    part = 0
    while list(run_dir.glob(f"trace.*.part{part}.msgpack")):
        part += 1
    for trace in run_dir.glob("trace.*.msgpack"):
        if ".part" not in trace.name:
            trace.rename(trace.with_name(trace.name.replace(".msgpack", f".part{part}.msgpack")))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rl_steps(run_dir: Path) -> list[dict[str, Any]]:
    """One row per RL step, in step order (the PolicyTrainer's rows)."""
    return sorted((row for row in read_metrics(run_dir) if RL_STEP_KEY in row), key=lambda row: row["step"])


def time_offset(run_dir: Path) -> float:
    """Where a resumed run's clock starts: the last kept row's time."""
    return max((row.get("time_s", 0.0) for row in read_metrics(run_dir)), default=0.0)


def metrics_summary(run_dir: Path) -> dict[str, float]:
    """steps, reward_start / reward_end, and the means of acceptance and speed over the run."""
    steps = rl_steps(run_dir)
    if not steps:
        return {}

    def mean(rows: list[dict], key: str) -> float:
        values = [row[key] for row in rows if row.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else 0.0

    return {
        "steps": steps[-1]["step"],
        "reward_start": mean(steps[:EDGE_STEPS], "reward_mean"),
        "reward_end": mean(steps[-EDGE_STEPS:], "reward_mean"),
        "accept_len_mean": mean(steps, "accept_len"),
        "gen_tokens_per_s_mean": mean(steps, "gen_tokens_per_s"),
        "staleness_mean": mean(steps, "staleness_mean"),
    }


PANELS = (("reward_mean", "reward (train batch)"), ("accuracy", "accuracy"),
          ("accept_len", "acceptance length"), ("gen_tokens_per_s", "generation tokens/s"))


def write_report(run_dir: Path, log=None) -> Path | None:
    """report.png: reward, accuracy, acceptance length and throughput against the RL step
    (top row) and against wall-clock time (bottom row). Nothing for a run without RL steps."""
    steps = rl_steps(run_dir)
    if not steps:
        return None
    try:
        return _plot(run_dir, steps)
    except Exception as error:  # noqa: BLE001 - a plot must never fail a finished run
        if log is not None:
            log.warning("report_failed", error=repr(error))
        return None


def _plot(run_dir: Path, steps: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [row for row in read_metrics(run_dir) if "heldout_accuracy" in row]
    figure, axes = plt.subplots(2, len(PANELS), figsize=(4 * len(PANELS), 6.5), squeeze=False)
    for column, (key, title) in enumerate(PANELS):
        for row, x_key, x_label in ((0, "step", "RL step"), (1, "time_s", "wall-clock s")):
            axis = axes[row][column]
            points = [(r[x_key], r[key]) for r in steps if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points, strict=True), marker=".", label="train batch")
            if key == "accuracy" and evals:
                axis.plot([r[x_key] for r in evals], [r["heldout_accuracy"] for r in evals], "o-",
                          color="tab:red", label="held-out")
                axis.legend(fontsize=7)
            axis.set_title(title, fontsize=10)
            axis.set_xlabel(x_label)
            axis.grid(alpha=0.3)
    figure.suptitle(f"{run_dir.name}")
    figure.tight_layout()
    path = run_dir / "report.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
