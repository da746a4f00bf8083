"""The ReSpec experiments that are whole RL runs: the same graph with one thing changed.

Each bench runs variants of a run file one after the other (same seed, same data order,
same steps), reads their metrics.jsonl and summary.json, and writes one JSON, one PNG and
a table:

- staleness: acceptance length over RL steps for a frozen drafter, online distillation
  without weighting and reward-weighted (ReSpec Fig. 4), and reward-weighted from the
  trainer's own pass (CapturedDistiller);
- quality: reward curves of no-SD and SD with each distillation mode (Fig. 10);
- interval: reward-weighted distillation every I in {1, 3, 5} policy versions (Fig. 15);
- e2e: wall-clock to the same number of RL steps for the synchronous no-SD baseline,
  asynchronous no-SD, asynchronous static SD and full respec (async + Scheduler +
  reward-weighted distillation), with each one's speedup over the baseline.

A variant is (run file, overrides in dotted form, as `respec run` applies them).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from rich.console import Console
from rich.table import Table

from respec.bench.batch_gaps import run_gaps
from respec.bench.console import table_console
from respec.runtime.graph import load_yaml
from respec.runtime.launcher import run_file

ASYNC_CONFIG = Path("configs/tiny.yaml")
SYNC_BASELINE = Path("configs/tiny_baseline.yaml")
WINDOW = 10  # steps averaged for "start" and "end" figures and the smoothed curves


@dataclass
class VariantResult:
    name: str
    trainer: list[dict[str, Any]]
    distiller: list[dict[str, Any]]
    summary: dict[str, Any]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # the run's seed where the bench repeats variants over seeds (else the file's)

    def edge(self, key: str, end: bool) -> float:
        rows = [r[key] for r in self.trainer if r.get(key) is not None]
        part = rows[-WINDOW:] if end else rows[:WINDOW]
        return round(sum(part) / len(part), 4) if part else 0.0


# ---------------------------------------------------------------------- variants


def distiller(config: Path, weighting: str, interval: int = 1, nice: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Overrides that add a DraftDistiller to `config`, starting from its Generator's head
    (the policy named by the Verifier, or by FastRollouts where there is no Verifier)."""
    _, policy, head = _distiller_sources(config)
    return {"actors.distiller": {
        "class": "respec.actors.draft_distiller.DraftDistiller", "group": "distiller",
        "params": {"model_path": policy, "draft_path": head,
                   "reward_weighting": weighting, "update_interval": interval, "nice": nice, "device": device}}}


def captured_distiller(config: Path, weighting: str, interval: int = 1, lr: float = 3e-4) -> dict[str, Any]:
    """Overrides that add a CapturedDistiller to `config`, in its trainer's process group and
    on its device, starting from its Generator's head. lr: the DraftDistiller's default, as
    one step per `interval` versions stands in for its `steps_per_update` steps."""
    actors, policy, head = _distiller_sources(config)
    trainer = actors["trainer"]
    return {"actors.distiller": {
        "class": "respec.actors.captured_distiller.CapturedDistiller", "group": trainer.get("group", "main"),
        "params": {"model_path": policy, "draft_path": head, "reward_weighting": weighting,
                   "update_interval": interval, "lr": lr, "device": trainer.get("params", {}).get("device", "cpu")}}}


def _distiller_sources(config: Path) -> tuple[dict[str, Any], str, str]:
    """`config`'s actors, the policy a distiller follows (the Verifier's, or FastRollouts'
    where there is no Verifier) and the Generator's head it starts from."""
    actors = load_yaml(config.read_text())["actors"]
    policy = (actors.get("verifier") or actors["generator"])["params"]["model_path"]
    return actors, policy, actors["generator"]["params"].get("draft_path", "")


def fast_rollouts(config: Path) -> dict[str, Any]:
    """Overrides that put FastRollouts, adaptive, in place of `config`'s Generator + Verifier
    pair: one batch per RL step, and the draft length per batch bucket from this machine's
    step costs and the run's acceptance (docs/RUNTIME.md, "FastRollouts")."""
    from respec.actors.prompt_source import PromptSource
    from respec.actors.verifier import Verifier

    actors = load_yaml(config.read_text())["actors"]
    prompts = msgspec.convert(actors["prompts"]["params"], PromptSource.Params)  # with the defaults filled in
    verifier = msgspec.convert(actors["verifier"]["params"], Verifier.Params)
    return {"actors.verifier": None, "actors.generator": {
        "class": "respec.actors.fast_rollouts.FastRollouts",
        "params": {"model_path": verifier.model_path, "draft_path": actors["generator"]["params"]["draft_path"],
                   "adaptive": [2, 4, 6], "max_rows": prompts.group_size * prompts.groups_per_step,
                   "max_len": verifier.max_len, "max_new_tokens": prompts.max_new_tokens, "profile_steps": 5}}}


def scheduler() -> dict[str, Any]:
    """The Scheduler at its defaults (per-bucket measured decisions, dwell, switch cost) and no
    profile: the prior only orders what each bucket explores first."""
    return {"actors.scheduler": {"class": "respec.actors.scheduler.Scheduler", "params": {}},
            "actors.generator.params.stats_every": 1}


NO_SD = {"actors.generator.params.drafter": "none", "actors.generator.params.shape": "nosd"}


# The run file may already name a Scheduler or a DraftDistiller (tiny.yaml names the
# Scheduler): every variant starts from it without them, so each is what its name says and
# acceptance is compared under one draft shape.
STATIC = {"actors.scheduler": None, "actors.distiller": None}


def staleness_variants(config: Path) -> dict[str, tuple[Path, dict]]:
    return {"frozen": (config, dict(STATIC)), "kd_none": (config, {**STATIC, **distiller(config, "none")}),
            "kd_reward": (config, {**STATIC, **distiller(config, "reward")}),
            # reward-weighted too, from the trainer's own pass (no replay buffer, no target pass)
            "kd_captured": (config, {**STATIC, **captured_distiller(config, "reward")})}


def quality_variants(config: Path) -> dict[str, tuple[Path, dict]]:
    return {"nosd": (config, {**STATIC, **NO_SD}), **{f"sd_{k}": v for k, v in staleness_variants(config).items()},
            "sd_kd_advantage": (config, {**STATIC, **distiller(config, "advantage")})}


def interval_variants(config: Path) -> dict[str, tuple[Path, dict]]:
    return {f"interval_{i}": (config, {**STATIC, **distiller(config, "reward", i)}) for i in (1, 3, 5)}


# A run file that already generates through FastRollouts (configs/gpu_fast.yaml): its
# baseline is the same file drafting nothing and generating synchronously.
FAST_SYNC_NOSD = {"actors.generator.params.adaptive": [], "actors.generator.params.draft_path": "",
                  "actors.prompts.params.max_staleness": 0}


def generates_fast(config: Path) -> bool:
    generator = load_yaml(config.read_text())["actors"].get("generator") or {}
    return str(generator.get("class", "")).endswith(".FastRollouts")


def e2e_variants(config: Path, baseline: Path, trainer_device: str = "") -> dict[str, tuple[Path, dict]]:
    """The variants against the synchronous no-SD baseline: for a file with the Generator +
    Verifier pair (tiny.yaml) the ladder from async no-SD to full respec, the baseline its
    own file; for a FastRollouts file (gpu_fast.yaml), `_fast_variants`."""
    if generates_fast(config):
        return _fast_variants(config, trainer_device)
    return {"sync_nosd": (baseline, {}), "async_nosd": (config, {**STATIC, **NO_SD}),
            "async_sd": (config, dict(STATIC)),
            "async_sd_sched": (config, {**STATIC, **scheduler()}),
            # every 3 versions, at the lowest priority: on a 2-core CPU the distiller shares the
            # cores with generation and training, and must only use what they leave idle
            "respec": (config, {**STATIC, **scheduler(), **distiller(config, "reward", 3, nice=19)}),
            # the same with the CapturedDistiller: in the trainer's process, from the update's pass
            "respec_captured": (config, {**STATIC, **scheduler(), **captured_distiller(config, "reward", 3)}),
            # the same, generating through the fast path with its own per-bucket choice
            "respec_fast": (config, {**STATIC, **fast_rollouts(config), **distiller(config, "reward", 3, nice=19)})}


def _fast_variants(config: Path, trainer_device: str) -> dict[str, tuple[Path, dict]]:
    """A FastRollouts file against itself without drafting or asynchrony (sync_nosd), with
    neither distiller (respec_fast), and with one beside the trainer (respec_fast_kd, on
    `trainer_device`, "": the trainer's in the file): the file's own DraftDistiller if it has
    one (its settings: gpu_fast.yaml's learning rate suits its head), else a reward-weighted
    one every 3 versions, at the lowest priority on a CPU."""
    actors = load_yaml(config.read_text())["actors"]
    if "distiller" in actors:
        without = {"actors.distiller": None}
        with_kd = {"actors.distiller.params.device": trainer_device} if trainer_device else {}
    else:
        device = str(trainer_device or actors["trainer"].get("params", {}).get("device", "cpu"))
        without, with_kd = {}, distiller(config, "reward", 3, nice=19 if device == "cpu" else 0, device=device)
    return {"sync_nosd": (config, {**FAST_SYNC_NOSD, **without}), "respec_fast": (config, without),
            "respec_fast_kd": (config, with_kd)}


# ---------------------------------------------------------------------- running


def run_variants(bench: str, variants: dict[str, tuple[Path, dict]], steps: int, extra: dict[str, Any],
                 console: Console, only: tuple[str, ...] = (), seed: int | None = None) -> list[VariantResult]:
    """Each variant (or the `only` ones) once, with `seed` as the run's seed if given (then
    the run is named after it)."""
    results = []
    for name, (config, overrides) in chosen(variants, only).items():
        run_name = f"bench_{bench}_{name}" + (f"_s{seed}" if seed is not None else "")
        console.print(f"[bold]{bench}[/]: {name}" + (f" seed {seed}" if seed is not None else "")
                      + f" ({steps} RL steps, {config})")
        overrides = {**overrides, **extra, "actors.trainer.params.max_steps": steps,
                     "actors.trainer.params.checkpoint_every": 0, **({"run.seed": seed} if seed is not None else {})}
        config, overrides = _removing(config, overrides, run_name)
        started = time.perf_counter()
        result = run_file(config, name=run_name, overrides=overrides, progress=False)
        if not result.ok:
            raise RuntimeError(f"{bench}/{name}: the run failed: {result.reason} (see {result.run_dir}/log.jsonl)")
        _refuse_rejections(bench, name, result)
        summary_path = result.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        rows = result.metrics
        results.append(VariantResult(
            name, [r for r in rows if r["source"].startswith("trainer") and "reward_mean" in r],
            [r for r in rows if r["source"].startswith("distiller")], summary, time.perf_counter() - started,
            _from_log(result.run_dir), seed))
    return results


def _refuse_rejections(bench: str, name: str, result) -> None:
    """A run whose actors rejected messages (frame_rejected: recorded, the actor goes on)
    ran a different graph than its file: its timing measures nothing asked for. An H100
    run's distiller rejected all of its inputs and the e2e table still showed the variant."""
    rejected = {actor: stats["rejected"] for actor, stats in (result.stats or {}).items() if stats.get("rejected")}
    if rejected:
        counts = ", ".join(f"{actor} {count}" for actor, count in sorted(rejected.items()))
        raise RuntimeError(f"{bench}/{name}: messages were rejected ({counts}); see frame_rejected in "
                           f"{result.run_dir}/log.jsonl")


def chosen(variants: dict[str, Any], only: tuple[str, ...]) -> dict[str, Any]:
    """The variants named in `only` (all when empty), in the bench's order."""
    unknown = set(only) - set(variants)
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(sorted(unknown))}; this bench has {', '.join(variants)}")
    return {name: variant for name, variant in variants.items() if not only or name in only}


def _removing(config: Path, overrides: dict[str, Any], name: str,
              directory: Path = Path("runs")) -> tuple[Path, dict[str, Any]]:
    """Overrides whose value is None remove that key: the run file is rewritten without it
    (under runs/, beside the run) when one is there, and the override dropped, with any
    override below it (`--set actors.distiller.params.lr=...` tunes the variants that keep
    a distiller, and is no error in those that drop it)."""
    remove = [key for key, value in overrides.items() if value is None]
    if not remove:
        return config, overrides
    raw = load_yaml(config.read_text())
    for dotted in remove:
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    path = directory / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, {k: v for k, v in overrides.items()
                  if v is not None and not any(k.startswith(removed + ".") for removed in remove)}


def _from_log(run_dir: Path) -> dict[str, Any]:
    """What a variant's result keeps from its run's log, read once (tens of MB on a GPU)."""
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return {"scheduler_decisions": scheduler_decisions(lines), "batch_gaps": run_gaps(lines),
            "step_costs": profiled_step_costs(lines)}


def scheduler_decisions(log_lines: list[str]) -> dict[str, int]:
    """SchedulerDecisions the run's Scheduler sent (config changes), by kind."""
    kinds: dict[str, int] = {}
    for line in log_lines:
        event = json.loads(line) if '"scheduler_decision"' in line else {}
        if "kind" in event:  # log.jsonl is appended to: lines of an older rule (no kind) are another run's
            kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
    return kinds


def profiled_step_costs(log_lines: list[str]) -> dict[str, Any] | None:
    """FastRollouts' step cost per "bucket/draft length" in ms and the draft lengths it chose
    from them (its `draft_lengths_profiled` event), the graphs it captured before its first
    batch, and each later change of the choice as [batch index, choice] (the draft lengths
    of its `batch_generated` events); None for a run without a profile."""
    costs, captured, changes, batches, last = None, None, [], 0, None
    for line in log_lines:
        if '"draft_lengths_profiled"' in line and costs is None:
            event = json.loads(line)
            costs, last = {key: event.get(key) for key in ("step_ms", "choice", "cached")}, event.get("choice")
        elif '"graphs_captured"' in line and captured is None:
            event = json.loads(line)
            captured = {key: event.get(key) for key in ("pairs", "seconds")}
        elif '"batch_generated"' in line and costs is not None:
            lengths = json.loads(line).get("draft_lengths")
            if isinstance(lengths, dict) and lengths != last:
                changes.append([batches, lengths])
                last = lengths
            batches += 1
    return None if costs is None else {**costs, "captured": captured, "choice_changes": changes}


def report(bench: str, results: list[VariantResult], columns: list[tuple[str, Any]], json_file: Path,
           curves: list[tuple[str, str]], console: Console, notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the table, write the JSON and a PNG with one panel per (metric, label)."""
    table = Table(title=f"respec bench {bench}")
    for title, _ in columns:
        table.add_column(title)
    for result in results:
        table.add_row(*[str(get(result)) for _, get in columns])
    console.print(table)
    payload = {"bench": bench, **(notes or {}),
               "variants": {_key(r): {**{title: get(r) for title, get in columns}, "summary": r.summary,
                                      "trainer": r.trainer, "distiller": r.distiller, "extra": r.extra}
                            for r in results}}
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(payload, indent=2, default=float))
    _plot(results, curves, json_file.with_suffix(".png"), bench)
    return payload


def _key(result: VariantResult) -> str:
    return result.name if result.seed is None else f"{result.name}@s{result.seed}"


def _plot(results: list[VariantResult], curves: list[tuple[str, str]], path: Path, bench: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for axis, (key, label) in zip(axes[0], curves, strict=True):
        for result in results:
            points = [(r["step"], r[key]) for r in result.trainer if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, smooth(list(values)), label=_key(result))
        axis.set_xlabel("RL step")
        axis.set_ylabel(f"{label} (mean of {WINDOW} steps)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"respec bench {bench}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def smooth(values: list[float]) -> list[float]:
    """Trailing mean over up to WINDOW points."""
    return [sum(values[max(0, i - WINDOW + 1): i + 1]) / (i + 1 - max(0, i - WINDOW + 1)) for i in range(len(values))]


# ---------------------------------------------------------------------- the benches


def bench_staleness(json_file: Path, steps: int, extra: dict[str, Any], config: Path = ASYNC_CONFIG,
                only: tuple[str, ...] = ()) -> dict:
    console = table_console()
    results = run_variants("staleness", staleness_variants(config), steps, extra, console, only)
    columns = [("variant", lambda r: r.name), ("accept_len start", lambda r: r.edge("accept_len", False)),
               ("accept_len end", lambda r: r.edge("accept_len", True)),
               ("end / start", lambda r: _ratio(r.edge("accept_len", True), r.edge("accept_len", False))),
               ("draft updates", lambda r: len(r.distiller)),
               ("held-out accuracy start -> end", _accuracy)]
    forms = _form_keys(results)  # a task that tells layouts apart (format_shift): where the policy went
    columns += [(f"{key} start -> end", lambda r, k=key: f"{r.edge(k, False)} -> {r.edge(k, True)}") for key in forms]
    curves = [("accept_len", "acceptance length"), ("reward_mean", "reward"),
              *[(key, f"share of responses in {key.removeprefix('form_')} form") for key in forms]]
    return report("staleness", results, columns, json_file, curves, console, {"steps": steps, "config": str(config)})


def _form_keys(results: list[VariantResult]) -> list[str]:
    """The `form_<name>` metrics the runs' trainer reported (Task.forms), "other" left out."""
    keys = {key for r in results for row in r.trainer for key in row if key.startswith("form_")}
    return sorted(keys - {"form_other"})


def bench_quality(json_file: Path, steps: int, extra: dict[str, Any], config: Path = ASYNC_CONFIG,
                only: tuple[str, ...] = ()) -> dict:
    console = table_console()
    results = run_variants("quality", quality_variants(config), steps, extra, console, only)
    columns = [("variant", lambda r: r.name), ("reward start", lambda r: r.edge("reward_mean", False)),
               ("reward end", lambda r: r.edge("reward_mean", True)), ("held-out accuracy start -> end", _accuracy),
               ("accept_len mean", lambda r: r.summary.get("accept_len_mean"))]
    return report("quality", results, columns, json_file, [("reward_mean", "reward"),
                                                           ("accept_len", "acceptance length")], console,
                  {"steps": steps})


def bench_interval(json_file: Path, steps: int, extra: dict[str, Any], config: Path = ASYNC_CONFIG,
                only: tuple[str, ...] = ()) -> dict:
    console = table_console()
    results = run_variants("interval", interval_variants(config), steps, extra, console, only)
    columns = [("variant", lambda r: r.name), ("accept_len start", lambda r: r.edge("accept_len", False)),
               ("accept_len end", lambda r: r.edge("accept_len", True)), ("draft updates", lambda r: len(r.distiller)),
               ("distill s", lambda r: round(sum(d.get("distill_s", 0.0) for d in r.distiller), 1)),
               ("wall s", lambda r: round(r.wall_s, 1))]
    return report("interval", results, columns, json_file, [("accept_len", "acceptance length"),
                                                            ("reward_mean", "reward")], console, {"steps": steps})


def bench_e2e(json_file: Path, steps: int, extra: dict[str, Any], config: Path = ASYNC_CONFIG,
              only: tuple[str, ...] = (), baseline: Path = SYNC_BASELINE,
              seeds: tuple[int | None, ...] = (None,)) -> dict:
    """Every variant (or the `only` ones, the baseline among them) once per seed; speedups
    against the same seed's baseline, and (with several seeds) a table over seeds: does
    each variant reach the baseline's accuracy?"""
    if only and "sync_nosd" not in only:
        raise ValueError("e2e compares every variant with sync_nosd: name it in --variants too")
    if generates_fast(config):  # its baseline is itself, changed (e2e_variants)
        baseline = config
    console = table_console()
    variants = e2e_variants(config, baseline, str(extra.get("actors.trainer.params.device", "")))
    results = [r for seed in seeds for r in run_variants("e2e", variants, steps, extra, console, only, seed)]
    base = {r.seed: _run_time(r) for r in results if r.name == "sync_nosd"}
    base_step = {r.seed: _step_time(r) for r in results if r.name == "sync_nosd"}
    # Two speedups: to the last step (start-up included, which decides short runs: timing the
    # drafts put respec's first step 13.7 s after the baseline's on two H100s), and per step
    # after the first (what decides a long run).
    columns = [("variant", lambda r: r.name), ("seed", lambda r: r.seed),
               ("time to last step s", lambda r: round(_run_time(r), 1)),
               ("speedup vs sync_nosd", lambda r: _ratio(base[r.seed], _run_time(r))),
               ("time to first step s", lambda r: round(r.trainer[0]["time_s"], 1) if r.trainer else 0.0),
               ("s per step after it", lambda r: round(_step_time(r), 3)),
               ("step speedup vs sync_nosd", lambda r: _ratio(base_step[r.seed], _step_time(r))),
               ("median step s", _median_step),
               ("trainer update / publish s", _trainer_cycle),
               ("reward start -> end", lambda r: f"{r.edge('reward_mean', False)} -> {r.edge('reward_mean', True)}"),
               ("held-out accuracy start -> end", _accuracy),
               ("accept_len mean", lambda r: r.summary.get("accept_len_mean")),
               ("scheduler decisions sent", lambda r: sum(r.extra["scheduler_decisions"].values())),
               ("decisions by kind", lambda r: r.extra["scheduler_decisions"]),
               ("draft updates", lambda r: len(r.distiller)),
               ("batch / gap / policy load s", _between_batches)]
    aggregate = over_seeds(results, base, _evaluations(baseline)) if len(seeds) > 1 else None
    payload = report("e2e", results, columns, json_file, [("reward_mean", "reward"), ("accept_len", "acceptance length")],
                     console, {"steps": steps, "seeds": list(seeds), **({"over_seeds": aggregate} if aggregate else {})})
    if aggregate:  # after the runs' table: the summary is what the output ends with
        _print_over_seeds(aggregate, console)
    return payload


def over_seeds(results: list[VariantResult], base: dict[int | None, float], evaluations: int) -> list[dict[str, Any]]:
    """Per variant over its seeds: mean speedup and mean step-time ratio (each against its
    own seed's baseline) and final held-out accuracy mean and standard deviation; `accuracy within noise` when the
    difference of means to the baseline's is at most twice its standard error. The error
    counts the spread over seeds and the evaluation's own sampling error (`evaluations`
    draws per accuracy, binomial): with few seeds that happen to agree, the spread alone
    would call any small difference real."""
    names = list(dict.fromkeys(r.name for r in results))
    by_name = {name: [r for r in results if r.name == name] for name in names}
    accuracy = {name: [float(r.summary.get("accuracy_end", 0.0)) for r in runs] for name, runs in by_name.items()}
    base_mean, base_spread = _mean_sd(accuracy["sync_nosd"])
    base_step = {r.seed: _step_time(r) for r in by_name["sync_nosd"]}
    rows = []
    for name, runs in by_name.items():
        mean, spread = _mean_sd(accuracy[name])
        sampling = (mean * (1 - mean) + base_mean * (1 - base_mean)) / evaluations
        error = ((spread ** 2 + base_spread ** 2 + sampling) / len(runs)) ** 0.5
        rows.append({"variant": name, "seeds": len(runs),
                     "speedup mean": round(sum(_ratio(base[r.seed], _run_time(r)) for r in runs) / len(runs), 3),
                     # issue 6's bar is in this form: a step's time over the sync step's, per seed, then the mean
                     "step time / sync mean": round(sum(_step_time(r) / base_step[r.seed] if base_step[r.seed] else 0.0
                                                        for r in runs) / len(runs), 3),
                     "accuracy end mean": round(mean, 4), "accuracy end sd": round(spread, 4),
                     "accuracy within noise": abs(mean - base_mean) <= 2 * error if name != "sync_nosd" else True})
    return rows


def _evaluations(config: Path) -> int:
    """Draws behind one held-out accuracy of the trainer in `config` (problems x samples)."""
    params = load_yaml(config.read_text())["actors"]["trainer"].get("params", {})
    return max(1, int(params.get("eval_problems", 0)) * int(params.get("eval_samples", 4)))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def _print_over_seeds(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="respec bench e2e, over seeds")
    for title in rows[0]:
        table.add_column(title)
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    console.print(table)


def _run_time(result: VariantResult) -> float:
    """Wall-clock from the launch to the last RL step (set-up and the step-0 evaluation
    included, the same for every variant; the final evaluation excluded)."""
    return result.trainer[-1]["time_s"] if result.trainer else 0.0


def _step_time(result: VariantResult) -> float:
    """Mean seconds per RL step after the first (start-up apart: on a GPU, tuning and
    capturing graphs took 20-55 s before the first step of a 50-step run)."""
    times = [r["time_s"] for r in result.trainer]
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0


def step_intervals(trainer: list[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive RL steps (the trainer's metrics rows, in order)."""
    times = [row["time_s"] for row in trainer]
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def _median_step(result: VariantResult) -> float:
    """The median step after the first: the mean's typical step, without its few slow ones
    (on two H100s, 8769895: a 2.2 s step moved one run's mean by 0.02 s)."""
    intervals = step_intervals(result.trainer)
    return round(statistics.median(intervals), 3) if intervals else 0.0


def trainer_cycle(trainer: list[dict[str, Any]]) -> dict[str, float] | None:
    """The trainer's median update and publish seconds after the first step (its metrics
    rows): with generation overlapped, the floor of an asynchronous step; None before a
    second step."""
    rows = trainer[1:]
    if not rows:
        return None
    return {key: statistics.median(float(row.get(key) or 0.0) for row in rows) for key in ("update_s", "publish_s")}


def _trainer_cycle(result: VariantResult) -> str:
    cycle = trainer_cycle(result.trainer)
    return "-" if cycle is None else f"{cycle['update_s']:.3f} / {cycle['publish_s']:.3f}"


def _accuracy(result: VariantResult) -> str:
    return f"{result.summary.get('accuracy_start', '?')} -> {result.summary.get('accuracy_end', '?')}"


def _between_batches(result: VariantResult) -> str:
    """FastRollouts' median batch, the gap before the next one and the policy load within
    it (respec/bench/batch_gaps.py); "-" for a run that generated another way."""
    gaps = result.extra.get("batch_gaps")
    if not gaps:
        return "-"
    return f"{gaps['batch_s']} / {gaps['gap_s']} / {gaps['policy_load_s']}"


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0
