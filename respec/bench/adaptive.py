"""`respec bench adaptive`: the Scheduler's choice against plain decoding and every static
draft shape, in one run, on the prepared tiny policy (ReSpec Fig. 7 and its long tail).

1. A profile of this machine (or `--profile FILE`), the Scheduler's starting point.
2. Batch sweep: for each batch size B, a pool of max(4B, 24) task prompts (greedy, stop at EOS,
   as RL poses them) runs with B rows in flight, a finished row's slot refilled at once
   (the Generator's continuous batching), so the batch stays at B until the pool drains.
   Every config, then the adaptive one: the Scheduler's decision rule (`SchedulerPolicy`,
   the actor's code) asked before every step, refreshed after it with the step's wall
   time and acceptance. One Scheduler lives through the whole bench, as one lives
   through an RL run: what it learns in one rollout (how far this machine's rollouts
   are from the profile) it keeps; its learning steps are in the measured runs (every
   run's tokens/s is in the JSON, the first one included).
3. Long tail: 64 prompts start together with lengths drawn from a log-normal (median 16
   tokens, clipped to [4, 128]: most rows short, a few long, as RL rollouts are), no
   stop token, so the batch shrinks from 64 to 1 as rows reach their length. Tokens past
   a row's answer are the policy's own greedy continuation. `tail_kind="natural"`
   (`--tail natural`): every row stops at its own EOS instead, so the lengths are the
   policy's answers (with a policy that writes answers of many lengths).
Each measurement is repeated (configs interleaved) and the median kept; greedy, and every
run is checked to emit exactly the tokens plain decoding emits. Throughput is emitted
(accepted + bonus) tokens over the wall time of the whole rollout, prefill included.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from respec.bench.console import table_console
from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.sched.cost_model import CostModel, octave
from respec.sched.policy import SchedulerPolicy
from respec.sched.profile import DEFAULT_CONFIGS, NOSD, Profile, grid_size, profile, profile_key
from respec.sched.setup import ModelSetup, build_drafter, task_prompts

ADAPTIVE = "adaptive"
# Plain decoding in the engine the adaptive rule runs in: drafter attached, ready for a
# switch to SD. Not a choice anyone would make; it shows what being able to switch costs.
# Until 2026-11-26 that engine captured the drafter's features on every plain step (this
# column was "nosd+features", 0.91-0.98 of nosd); now it captures none and rebuilds a
# row's features when SD comes back on, so this should match nosd.
NOSD_READY = "nosd+drafter"
# The long tail's lengths: drawn from a log-normal and forced (no stop token), or each row's
# own answer (stop at EOS; a policy whose answers vary in length, e.g. prepared on 2-8 operands).
TAIL_KINDS = ("lognormal", "natural")
NATURAL_MAX_NEW = 160
PROFILE_CONTEXTS = (16, 64, 144)


class Static:
    def __init__(self, config: str) -> None:
        self.name, self.shape = config, None if config == NOSD else DraftShape.parse(config)

    def choose(self, batch: int, context: float) -> DraftShape | None:
        return self.shape

    def observe(self, batch: int, context: float, step_s: float, accept_len: float) -> None:
        pass


class Adaptive:
    """The Scheduler's rule in-process: decide before each step, learn from its timing."""

    def __init__(self, policy: SchedulerPolicy) -> None:
        self.name, self.policy, self.config = ADAPTIVE, policy, NOSD

    def choose(self, batch: int, context: float) -> DraftShape | None:
        decision = self.policy.decide(batch, context)
        self.config = decision.config
        return decision.shape

    def observe(self, batch: int, context: float, step_s: float, accept_len: float) -> None:
        self.policy.observe(self.config, batch, context, step_s, accept_len)


def rollout(model, drafter, prompts: list[torch.Tensor], budgets: list[int], max_rows: int,
            stop: tuple[int, ...], chooser) -> dict:
    """Generate every prompt with at most max_rows in flight; the chooser picks each step's shape."""
    reserve = max(DraftShape.parse(c).num_draft for c in DEFAULT_CONFIGS) + 1
    engine = SpeculativeEngine(model, drafter, max_rows, max(len(p) for p in prompts) + max(budgets) + reserve + 1)
    waiting = deque(zip(range(len(prompts)), prompts, budgets, strict=True))
    order, used, tokens = {}, Counter(), 0
    buckets: dict[int, dict] = {}  # batch bucket -> steps, seconds and configs there: where time went
    started = time.perf_counter()
    while waiting or engine.rows:
        _admit(engine, waiting, order, stop, reserve)
        rows = list(engine.rows.values())
        context = max(len(r.prompt) + len(r.tokens) for r in rows)  # attention reads up to the longest row
        shape = chooser.choose(len(rows), context)
        step_started = time.perf_counter()
        stats = engine.step(shape)
        step_s = time.perf_counter() - step_started
        chooser.observe(len(rows), context, step_s, stats.tokens / stats.rows)
        used[shape.name if shape else NOSD] += 1
        _count_bucket(buckets, len(rows), shape.name if shape else NOSD, step_s, stats.tokens)
        tokens += stats.tokens
    wall = time.perf_counter() - started
    finished = sorted(engine.finished, key=lambda row: order[row.row_id])
    emitted = sum(len(row.tokens) for row in finished)
    return {"tokens_per_s": emitted / wall, "wall_s": wall, "tokens": emitted, "steps": sum(used.values()),
            "accept_len": tokens / max(sum(r.steps for r in finished), 1), "configs_used": dict(used),
            "outputs": [row.tokens for row in finished], "by_bucket": dict(sorted(buckets.items()))}


def _count_bucket(buckets: dict[int, dict], batch: int, config: str, step_s: float, tokens: int) -> None:
    entry = buckets.setdefault(octave(batch), {"steps": 0, "step_s": 0.0, "tokens": 0, "configs": Counter()})
    entry["steps"] += 1
    entry["step_s"] = round(entry["step_s"] + step_s, 5)
    entry["tokens"] += tokens
    entry["configs"][config] += 1


def _admit(engine: SpeculativeEngine, waiting: deque, order: dict, stop: tuple[int, ...], reserve: int) -> None:
    """Fill free slots; each row gets its own length budget (prefill shares a pass by length)."""
    admitted = [waiting.popleft() for _ in range(min(engine.target.free_slots, len(waiting)))]
    if not admitted:
        return
    sampling = Sampling(temperature=0.0, max_new_tokens=max(b for _, _, b in admitted), stop_token_ids=stop)
    ids = engine.add([p for _, p, _ in admitted], sampling, reserve)
    for row_id, (index, _, budget) in zip(ids, admitted, strict=True):
        order[row_id] = index
        row = engine.rows.get(row_id)
        if row is not None:
            row.sampling = replace(sampling, max_new_tokens=budget)


def long_tail_budgets(count: int, seed: int = 0, median: int = 16, sigma: float = 0.9,
                      low: int = 4, high: int = 128) -> list[int]:
    lengths = np.exp(np.random.default_rng(seed).normal(np.log(median), sigma, count))
    return [int(v) for v in np.clip(np.round(lengths), low, high)]


def compare(model, drafter, prompts, budgets, max_rows, stop, configs, adaptive: Adaptive, repeats: int,
            advance) -> dict[str, dict]:
    """Tokens/s of every config and the adaptive rule; outputs checked against plain decoding.

    Each repeat runs every config once, in an order rotated from repeat to repeat, so a
    slow drift of the machine's load (other processes) lands on all of them alike; the
    ratios between configs are taken within a repeat (paired), then their median."""
    names = [NOSD, NOSD_READY, *configs, ADAPTIVE]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for name in (NOSD, configs[0]) if configs else (NOSD,):  # warm-up, not timed: first calls pay allocation
        rollout(model, drafter if name != NOSD else None, prompts[:max_rows], budgets[:max_rows], max_rows, stop,
                Static(name))
    reference = None
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            chooser = adaptive if name == ADAPTIVE else Static(NOSD if name == NOSD_READY else name)
            result = rollout(model, drafter if name != NOSD else None, prompts, budgets, max_rows, stop, chooser)
            reference = reference or result["outputs"]
            if result["outputs"] != reference:
                raise AssertionError(f"greedy {name} changed the output (batch {max_rows})")
            runs[name].append(result)
            advance()
    summary = {name: _median_run(results) for name, results in runs.items()}
    summary[NOSD]["lengths"] = [len(tokens) for tokens in reference]  # every config emitted these (checked)
    for name in names:
        summary[name]["vs_nosd"] = _paired(runs[name], runs[NOSD])
    return summary


def _paired(runs: list[dict], baseline: list[dict]) -> float:
    """Median over repeats of tokens/s relative to the baseline's run of the same repeat."""
    return round(statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, baseline, strict=True)),
                 3)


def _median_run(results: list[dict]) -> dict:
    speeds = [r["tokens_per_s"] for r in results]
    middle = results[speeds.index(statistics.median_low(speeds))]
    return {"tokens_per_s": round(statistics.median(speeds), 2), "best_tokens_per_s": round(max(speeds), 2),
            "runs_tokens_per_s": [round(s, 2) for s in speeds], "accept_len": round(middle["accept_len"], 3),
            "steps": middle["steps"], "tokens": middle["tokens"], "configs_used": middle["configs_used"],
            "by_bucket": middle["by_bucket"]}


def run_benchmark(model_dir: str = "models/tiny/policy", draft: str = "models/tiny/eagle",
                  batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), configs: tuple[str, ...] = DEFAULT_CONFIGS,
                  profile_path: str | None = None, profile_out: str | None = None, repeats: int = 5,
                  long_tail_rows: int = 64, margin: float = 0.05, patience: int = 2, probe_every: int = 50,
                  probe_within: float = 0.2, min_dwell: int = 8, explore_steps: int = 3,
                  threads: int = 1, seed: int = 0, tail_kind: str = "lognormal") -> dict:
    if tail_kind not in TAIL_KINDS:
        raise ValueError(f"tail {tail_kind!r}: choose from {', '.join(TAIL_KINDS)}")
    torch.set_num_threads(threads)  # one thread: the 2-core machine is shared; ratios are what count
    setup = ModelSetup(model_dir, "ngram" if draft == "ngram" else "eagle", "" if draft == "ngram" else draft)
    model = load_model(Path(model_dir))
    drafter = build_drafter(setup, model)
    key = profile_key(model_dir, setup.drafter, setup.draft_path, "cpu")
    with Progress(console=Console(stderr=True), transient=True) as progress:
        measured = _profile(model, drafter, key, configs, batches, profile_path, profile_out, progress, seed)
        adaptive = Adaptive(SchedulerPolicy(CostModel.build(configs, measured), configs, margin, patience,
                                            probe_every=probe_every, probe_within=probe_within,
                                            min_dwell=min_dwell, explore_steps=explore_steps))
        names = len(configs) + 3
        task = progress.add_task("bench adaptive", total=(len(batches) + 1) * names * repeats)
        sweep = []
        for batch in batches:
            prompts, stop = task_prompts(model_dir, max(4 * batch, 24), seed + batch)  # >= ~0.5 s a run
            results = compare(model, drafter, prompts, [64] * len(prompts), batch, stop, configs, adaptive, repeats,
                              lambda: progress.advance(task))
            sweep.append({"batch": batch, "results": results})
        prompts, eos = task_prompts(model_dir, long_tail_rows, seed + 7)
        if tail_kind == "natural":  # every row to its own stop token: the lengths are the policy's answers
            budgets, stop = [NATURAL_MAX_NEW] * long_tail_rows, eos
        else:
            budgets, stop = long_tail_budgets(long_tail_rows, seed), ()
        tail = compare(model, drafter, prompts, budgets, long_tail_rows, stop, configs, adaptive, repeats,
                       lambda: progress.advance(task))
    results = {"model": model_dir, "draft": draft, "profile": key, "profile_source": profile_path or "measured",
               "profile_wall_s": measured.wall_s, "profile_accept_len": measured.accept_len, "configs": list(configs),
               "margin": margin, "patience": patience, "probe_every": probe_every, "probe_within": probe_within,
               "min_dwell": min_dwell, "explore_steps": explore_steps,
               "decisions_by_kind": dict(adaptive.policy.kinds),
               "switch_cost_ms": {k: round(1e3 * e.value, 3) for k, e in adaptive.policy.switch_cost.items()},
               "repeats": repeats, "threads": threads,
               "sweep": [_summarise_batch(entry) for entry in sweep],
               "long_tail": {**_summarise_tail(tail), "kind": tail_kind}}
    return results


def _profile(model, drafter, key, configs, batches, path, out, progress, seed) -> Profile:
    if path:
        loaded = Profile.load(path)
        for difference in loaded.matches(key):
            Console(stderr=True).print(f"[yellow]profile {path} is foreign ({difference}); corrected online[/]")
        return loaded
    task = progress.add_task("profile", total=grid_size(configs, batches, PROFILE_CONTEXTS, True))
    measured = profile(model, drafter, key, configs, batches, PROFILE_CONTEXTS,
                       accept_prompts=task_prompts(key["model_path"], 16, seed + 99),
                       advance=lambda label, points: progress.advance(task, points))
    if out:
        measured.save(out)
    return measured


def _versus_best(results: dict) -> tuple[str, float]:
    """The best static config (highest median ratio to no-SD, paired within repeats) and
    the adaptive rule's ratio to it."""
    statics = {name: r["vs_nosd"] for name, r in results.items() if name not in (ADAPTIVE, NOSD_READY)}
    best = max(statics, key=statics.get)
    return best, round(results[ADAPTIVE]["vs_nosd"] / statics[best], 3)


def _summarise_batch(entry: dict) -> dict:
    best, ratio = _versus_best(entry["results"])
    return {"batch": entry["batch"], "results": entry["results"], "best_static": best, "adaptive_vs_best": ratio}


def _summarise_tail(results: dict) -> dict:
    best, ratio = _versus_best(results)
    lengths = results[NOSD]["lengths"]
    return {"rows": len(lengths), "lengths": {"median": int(np.median(lengths)), "p90": int(np.percentile(lengths, 90)),
                                              "max": max(lengths), "total": sum(lengths)},
            "results": results, "best_static": best, "adaptive_vs_best": ratio,
            "adaptive_beats_every_static": ratio > 1.0}


def print_tables(results: dict) -> None:
    console = table_console()
    names = [NOSD, NOSD_READY, *results["configs"], ADAPTIVE]
    table = Table(title=f"respec bench adaptive: tokens/s (x no-SD, paired) by batch size ({results['draft']}; "
                        f"median of {results['repeats']})")
    for column in ("batch", *names, "best static", "adaptive / best", "adaptive ran"):
        table.add_column(column, justify="right")
    for entry in results["sweep"]:
        speeds = [f"{entry['results'][n]['tokens_per_s']:.0f} ({entry['results'][n]['vs_nosd']:.2f})" for n in names]
        table.add_row(str(entry["batch"]), *speeds, entry["best_static"], f"{entry['adaptive_vs_best']:.2f}x",
                      _used(entry["results"][ADAPTIVE]["configs_used"]))
    console.print(table)
    tail = results["long_tail"]
    lengths = tail["lengths"]
    table = Table(title=f"long tail: {tail['rows']} rows, lengths median {lengths['median']}, p90 {lengths['p90']}, "
                        f"max {lengths['max']}")
    for column in ("config", "tokens/s", "x no-SD (paired)", "accept len", "steps", "ran"):
        table.add_column(column, justify="right")
    for name in names:
        row = tail["results"][name]
        table.add_row(name, f"{row['tokens_per_s']:.0f}", f"{row['vs_nosd']:.2f}x",
                      f"{row['accept_len']:.2f}", str(row["steps"]), _used(row["configs_used"]))
    console.print(table)


def _used(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return " ".join(f"{name} {count / total:.0%}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (sweep_axis, tail_axis) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    batches = [entry["batch"] for entry in results["sweep"]]
    for name in [NOSD, NOSD_READY, *results["configs"], ADAPTIVE]:
        speeds = [entry["results"][name]["tokens_per_s"] for entry in results["sweep"]]
        style = {"color": "black", "linewidth": 2.5} if name == ADAPTIVE else {}
        style = {"color": "grey", "linestyle": "--"} if name == NOSD_READY else style
        sweep_axis.plot(batches, speeds, marker="o", label=name, **style)
    sweep_axis.set_xscale("log", base=2)
    sweep_axis.set_yscale("log")
    sweep_axis.set_xticks(batches, [str(b) for b in batches])
    sweep_axis.set_xlabel("batch size (rows in flight)")
    sweep_axis.set_ylabel("accepted tokens/s")
    sweep_axis.set_title("throughput against batch size")
    sweep_axis.legend(fontsize=8)
    tail = results["long_tail"]["results"]
    names = [NOSD, NOSD_READY, *results["configs"], ADAPTIVE]
    tail_axis.bar(names, [tail[n]["tokens_per_s"] for n in names],
                  color=["black" if n == ADAPTIVE else "tab:blue" for n in names])
    tail_axis.set_ylabel("accepted tokens/s")
    tail_axis.set_title("long-tail rollout phase (batch shrinks 64 -> 1)")
    tail_axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
