"""The RL-run benches: variants built from the run file, the report they write."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from respec.bench import rl_runs
from respec.bench.rl_runs import VariantResult, e2e_variants, report, smooth, staleness_variants
from respec.runtime.graph import load_config
from respec.runtime.plan import build_plan

RUN = """
run: {name: t}
actors:
  prompts: {class: respec.actors.prompt_source.PromptSource, params: {tokenizer_path: pol}}
  generator: {class: respec.actors.generator.Generator,
              params: {max_rows: 8, drafter: eagle, model_path: pol, draft_path: head}}
  verifier: {class: respec.actors.verifier.Verifier, params: {model_path: pol, max_rows: 8}}
  scorer: {class: respec.actors.reward_scorer.RewardScorer, params: {tokenizer_path: pol}}
  trainer: {class: respec.actors.policy_trainer.PolicyTrainer, params: {model_path: pol}}
"""


def test_variants_add_a_distiller_and_a_scheduler_that_plan(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    variants = staleness_variants(path)
    assert list(variants) == ["frozen", "kd_none", "kd_reward", "kd_captured"]
    assert variants["frozen"][1] == {"actors.scheduler": None, "actors.distiller": None}  # one draft shape
    params = variants["kd_reward"][1]["actors.distiller"]["params"]
    assert (params["model_path"], params["draft_path"], params["reward_weighting"]) == ("pol", "head", "reward")
    plans = {}
    for name, (config, overrides) in e2e_variants(path, path).items():  # every variant is a valid graph
        config, overrides = rl_runs._removing(config, overrides, name, tmp_path)
        plans[name] = build_plan(load_config(config, overrides), str(config))
        assert {"prompts", "trainer"} <= set(plans[name].actors)
    assert {"scheduler", "distiller"} <= set(plans["respec"].actors)
    assert plans["respec"].actors["distiller"].spec.params["nice"] == 19
    assert "scheduler" in plans["async_sd_sched"].actors and "distiller" not in plans["async_sd_sched"].actors
    captured = plans["respec_captured"].actors["distiller"]  # beside the trainer (group main here)
    assert captured.cls.__name__ == "CapturedDistiller" and captured.spec.group == plans["respec"].actors["trainer"].spec.group
    assert (captured.spec.params["update_interval"], captured.spec.params["draft_path"]) == (3, "head")
    fast = plans["respec_fast"].actors  # FastRollouts in place of the pair, with the distiller
    assert fast["generator"].cls.__name__ == "FastRollouts" and {"verifier", "scheduler"}.isdisjoint(fast)
    assert fast["generator"].spec.params["draft_path"] == "head" and "distiller" in fast


FAST_RUN = """
run: {name: t}
actors:
  prompts: {class: respec.actors.prompt_source.PromptSource, params: {tokenizer_path: pol}}
  generator: {class: respec.actors.fast_rollouts.FastRollouts,
              params: {model_path: pol, draft_path: head, adaptive: [2, 4], max_rows: 8}}
  scorer: {class: respec.actors.reward_scorer.RewardScorer, params: {tokenizer_path: pol}}
  trainer: {class: respec.actors.policy_trainer.PolicyTrainer, params: {model_path: pol}}
"""


def test_a_fast_path_run_file_runs_against_itself_without_drafting_or_asynchrony(tmp_path):
    """configs/gpu_fast.yaml already generates through FastRollouts: e2e compares it as it is
    with the same file drafting nothing (no head, no adaptive lengths) and synchronous."""
    path = tmp_path / "run.yaml"
    path.write_text(FAST_RUN)
    variants = e2e_variants(path, path)
    assert list(variants) == ["sync_nosd", "respec_fast", "respec_fast_kd"]
    plans = {name: build_plan(load_config(config, overrides), str(config))
             for name, (config, overrides) in variants.items()}
    base, fast = (plans[name].actors for name in ("sync_nosd", "respec_fast"))
    assert base["generator"].spec.params["adaptive"] == [] and base["generator"].spec.params["draft_path"] == ""
    assert base["prompts"].spec.params["max_staleness"] == 0
    assert fast["generator"].spec.params["adaptive"] == [2, 4] and fast["generator"].spec.params["draft_path"] == "head"


def test_a_setting_of_an_actor_a_variant_drops_applies_to_the_others(tmp_path):
    """`--set actors.distiller.params.X=...` on a file with a distiller: the variants
    without one run (the key is dropped with the actor), the one with it takes it."""
    path = tmp_path / "run.yaml"
    path.write_text(FAST_RUN + "  distiller: {class: respec.actors.captured_distiller.CapturedDistiller,\n"
                               "              params: {model_path: pol, draft_path: head}}\n")
    extra = {"actors.distiller.params.worker_thread": False}
    plans = {}
    for name, (config, overrides) in e2e_variants(path, path).items():
        config, overrides = rl_runs._removing(config, {**overrides, **extra}, name, tmp_path)
        plans[name] = build_plan(load_config(config, overrides), str(config)).actors
    assert "distiller" not in plans["sync_nosd"] and "distiller" not in plans["respec_fast"]
    assert plans["respec_fast_kd"]["distiller"].spec.params["worker_thread"] is False


def test_static_variants_drop_a_scheduler_the_run_file_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN + "  scheduler: {class: respec.actors.scheduler.Scheduler}\n")
    for name in ("async_nosd", "async_sd"):
        config, overrides = rl_runs._removing(*e2e_variants(path, path)[name], name, tmp_path)
        assert "scheduler" not in build_plan(load_config(config, overrides), str(config)).actors


def test_smooth_is_a_trailing_mean(monkeypatch):
    monkeypatch.setattr(rl_runs, "WINDOW", 2)
    assert smooth([1.0, 3.0, 5.0]) == [1.0, 2.0, 4.0]


def test_report_writes_json_and_png(tmp_path):
    rows = [{"step": s, "time_s": float(s), "accept_len": 2.0 - s / 100, "reward_mean": s / 100} for s in range(1, 31)]
    results = [VariantResult("a", rows, [], {"accuracy_start": 0.4, "accuracy_end": 0.5}, 30.0),
               VariantResult("b", rows[:20], [{"distill_s": 1.0}], {}, 20.0)]
    columns = [("variant", lambda r: r.name), ("accept end", lambda r: r.edge("accept_len", True))]
    out = tmp_path / "bench.json"
    payload = report("x", results, columns, out, [("accept_len", "acceptance")], Console(file=open("/dev/null", "w")))
    assert payload["variants"]["a"]["accept end"] == round(sum(2.0 - s / 100 for s in range(21, 31)) / 10, 4)
    assert json.loads(out.read_text())["variants"]["b"]["distiller"] == [{"distill_s": 1.0}]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_over_seeds_compares_each_variant_with_its_own_seeds_baseline():
    def run(name, seed, time_s, accuracy):
        return VariantResult(name, [{"step": 1, "time_s": time_s}], [], {"accuracy_end": accuracy}, time_s, seed=seed)

    results = [run("sync_nosd", 0, 10.0, 0.50), run("sync_nosd", 1, 20.0, 0.52), run("sync_nosd", 2, 10.0, 0.54),
               run("respec", 0, 5.0, 0.51), run("respec", 1, 5.0, 0.53), run("respec", 2, 10.0, 0.52),
               run("worse", 0, 10.0, 0.30), run("worse", 1, 20.0, 0.31), run("worse", 2, 10.0, 0.32)]
    base = {r.seed: r.trainer[-1]["time_s"] for r in results if r.name == "sync_nosd"}
    rows = {row["variant"]: row for row in rl_runs.over_seeds(results, base, evaluations=100_000)}
    assert rows["respec"]["speedup mean"] == round((2.0 + 4.0 + 1.0) / 3, 3)  # per seed, then the mean
    assert rows["respec"]["accuracy end mean"] == 0.52 and rows["respec"]["accuracy end sd"] == 0.01
    assert rows["respec"]["accuracy within noise"] and not rows["worse"]["accuracy within noise"]
    # from 10 draws per evaluation an accuracy is too noisy to tell 0.52 from 0.31
    assert rl_runs.over_seeds(results, base, evaluations=10)[-1]["accuracy within noise"]


def test_seeds_are_refused_where_they_are_not_used_and_when_not_numbers():
    from typer.testing import CliRunner

    from respec.cli import app

    refused = CliRunner().invoke(app, ["bench", "staleness", "--seeds", "0,1"])
    assert refused.exit_code == 2 and "is for `respec bench e2e` only" in refused.output
    garbled = CliRunner().invoke(app, ["bench", "e2e", "--seeds", "0,x"])
    assert garbled.exit_code == 2 and "not a comma-separated list of whole numbers" in garbled.output
    without_baseline = CliRunner().invoke(app, ["bench", "e2e", "--variants", "respec"])
    assert without_baseline.exit_code == 2 and "name it in --variants too" in without_baseline.output


def test_staleness_reports_the_share_of_each_form_the_task_tells_apart(tmp_path, monkeypatch):
    rows = [{"step": s, "source": "trainer", "reward_mean": 0.1, "accept_len": 2.0, "form_common": 1 - s / 20,
             "form_rare": s / 20, "form_other": 0.0} for s in range(1, 21)]
    (tmp_path / "run.yaml").write_text(RUN)
    monkeypatch.setattr(rl_runs, "run_variants", lambda *args: [VariantResult("frozen", rows, [], {}, 1.0)])
    payload = rl_runs.bench_staleness(tmp_path / "s.json", 20, {}, tmp_path / "run.yaml")
    frozen = payload["variants"]["frozen"]
    assert frozen["form_rare start -> end"] == "0.275 -> 0.775" and "form_other start -> end" not in frozen
    assert payload["config"] == str(tmp_path / "run.yaml")


def test_a_bench_runs_only_the_variants_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    variants = staleness_variants(path)
    assert list(rl_runs.chosen(variants, ("kd_reward", "frozen"))) == ["frozen", "kd_reward"]  # the bench's order
    assert list(rl_runs.chosen(variants, ())) == ["frozen", "kd_none", "kd_reward", "kd_captured"]
    with pytest.raises(ValueError, match="unknown variant.*kd_fast.*this bench has frozen"):
        rl_runs.chosen(variants, ("kd_fast",))


def test_set_overrides_reach_the_bench_as_extra_keys(monkeypatch):
    """`--set KEY=VALUE` goes into every variant's overrides (run_variants merges `extra`),
    so one run file serves e.g. a trainer on the second GPU."""
    from typer.testing import CliRunner

    from respec.cli import app

    seen = {}
    monkeypatch.setattr(rl_runs, "bench_e2e", lambda json_file, steps, extra, *rest, **kw: seen.update(extra))
    result = CliRunner().invoke(app, ["bench", "e2e", "--lr", "0.5", "--set", "actors.trainer.params.device=cuda:1",
                                      "--set", "run.seed=3"])
    assert result.exit_code == 0, result.output
    assert seen == {"actors.trainer.params.lr": 0.5, "actors.trainer.params.device": "cuda:1", "run.seed": 3}
    garbled = CliRunner().invoke(app, ["bench", "e2e", "--set", "no-equals-sign"])
    assert garbled.exit_code == 2 and "--set takes KEY=VALUE" in garbled.output


def test_e2e_reports_the_speedup_to_the_last_step_and_per_step_after_the_first(tmp_path, monkeypatch):
    """A variant slower to start and faster per step: its speedup to the last step (start-up
    included) is below 1 while its per-step speedup is above (the two GPU runs' shape)."""
    (tmp_path / "run.yaml").write_text(RUN)

    def run(name, first, per_step):
        rows = [{"step": s, "time_s": first + (s - 1) * per_step, "reward_mean": 0.1, "accept_len": 1.0}
                for s in range(1, 31)]
        return VariantResult(name, rows, [], {}, rows[-1]["time_s"], extra={"scheduler_decisions": {}})

    monkeypatch.setattr(rl_runs, "run_variants", lambda *args: [run("sync_nosd", 18.7, 0.344),
                                                                run("respec", 32.4, 0.204)])
    variants = rl_runs.bench_e2e(tmp_path / "e.json", 30, {}, tmp_path / "run.yaml", baseline=tmp_path / "run.yaml")[
        "variants"]
    respec = variants["respec"]
    assert respec["speedup vs sync_nosd"] < 1 < respec["step speedup vs sync_nosd"]
    assert respec["batch / gap / policy load s"] == "-"  # generated without FastRollouts: no batches
    assert respec["step speedup vs sync_nosd"] == round(0.344 / 0.204, 3)
    assert variants["sync_nosd"]["step speedup vs sync_nosd"] == 1.0


def test_over_seeds_gives_the_mean_step_time_over_the_sync_step_per_seed():
    def run(name, seed, per_step):
        rows = [{"step": s, "time_s": 20.0 + s * per_step} for s in range(1, 11)]
        return VariantResult(name, rows, [], {"accuracy_end": 0.5}, rows[-1]["time_s"], seed=seed)

    results = [run("sync_nosd", 0, 0.32), run("sync_nosd", 1, 0.30), run("respec", 0, 0.16), run("respec", 1, 0.18)]
    base = {r.seed: r.trainer[-1]["time_s"] for r in results if r.name == "sync_nosd"}
    rows = {row["variant"]: row for row in rl_runs.over_seeds(results, base, evaluations=100)}
    assert rows["respec"]["step time / sync mean"] == round((0.16 / 0.32 + 0.18 / 0.30) / 2, 3) == 0.55
    assert rows["sync_nosd"]["step time / sync mean"] == 1.0


def test_e2e_reports_the_median_step_beside_the_mean_and_the_trainers_cycle(tmp_path, monkeypatch):
    """One slow step (a mid-run graph capture: 2.2 s) moves the mean, not the median; the
    trainer's median update and publish are the floor of an overlapped step."""
    (tmp_path / "run.yaml").write_text(RUN)
    gaps = [0.15] * 20 + [2.2] + [0.14] * 9
    times = [10.0 + sum(gaps[:s]) for s in range(31)]
    rows = [{"step": s + 1, "time_s": t, "reward_mean": 0.1, "accept_len": 1.0, "update_s": 0.1 + 0.001 * (s % 3),
             "publish_s": 0.02} for s, t in enumerate(times)]
    result = VariantResult("sync_nosd", rows, [], {}, rows[-1]["time_s"], extra={"scheduler_decisions": {}})
    monkeypatch.setattr(rl_runs, "run_variants", lambda *args: [result])
    row = rl_runs.bench_e2e(tmp_path / "e.json", 30, {}, tmp_path / "run.yaml", baseline=tmp_path / "run.yaml")[
        "variants"]["sync_nosd"]
    assert row["s per step after it"] == round(sum(gaps) / 30, 3) == 0.215
    assert row["median step s"] == 0.15
    assert row["trainer update / publish s"] == "0.101 / 0.020"
    assert rl_runs.step_intervals(rows[:3]) == pytest.approx([0.15, 0.15])


def test_the_fast_files_distilling_variant_puts_the_distiller_beside_the_trainer(tmp_path):
    """respec_fast_kd: FastRollouts names the policy (there is no Verifier), and the
    distiller goes where the trainer is: the --set device, else the file's, niced on a CPU."""
    path = tmp_path / "run.yaml"
    path.write_text(FAST_RUN)
    _, overrides = e2e_variants(path, path, trainer_device="cuda:1")["respec_fast_kd"]
    params = overrides["actors.distiller"]["params"]
    assert (params["model_path"], params["draft_path"], params["device"], params["nice"]) == ("pol", "head",
                                                                                             "cuda:1", 0)
    _, overrides = e2e_variants(path, path)["respec_fast_kd"]
    assert (overrides["actors.distiller"]["params"]["device"], overrides["actors.distiller"]["params"]["nice"]) == (
        "cpu", 19)
    plan = build_plan(load_config(path, overrides), str(path))
    assert plan.actors["distiller"].cls.__name__ == "DraftDistiller" and plan.actors["distiller"].spec.group == "distiller"


def test_a_fast_file_with_its_own_distiller_keeps_its_settings_and_the_others_drop_it(tmp_path):
    """gpu_fast.yaml names a DraftDistiller (with the learning rate its head needs): the
    distilling variant runs it as written, moved beside a --set trainer; the other two
    run without it."""
    path = tmp_path / "run.yaml"
    path.write_text(FAST_RUN + "  distiller: {class: respec.actors.draft_distiller.DraftDistiller, group: distiller,\n"
                               "              params: {model_path: pol, draft_path: head, lr: 5e-5, device: cpu}}\n")
    variants = e2e_variants(path, path, trainer_device="cuda:1")
    plans = {name: build_plan(load_config(config, overrides), str(config))
             for name, (config, overrides) in variants.items()}
    assert "distiller" not in plans["sync_nosd"].actors and "distiller" not in plans["respec_fast"].actors
    params = plans["respec_fast_kd"].actors["distiller"].spec.params
    assert (params["lr"], params["device"], params["draft_path"]) == (5e-5, "cuda:1", "head")
    _, overrides = e2e_variants(path, path)["respec_fast_kd"]
    assert overrides == {}  # the file as it is


def test_a_variant_whose_actors_rejected_messages_fails_the_bench(tmp_path, monkeypatch):
    """Its run was ok (rejections are recorded, not fatal), but it is not the graph asked for."""
    from types import SimpleNamespace

    stats = {"trainer/0": {"rejected": 0}, "distiller/0": {"rejected": 200}}
    monkeypatch.setattr(rl_runs, "run_file", lambda *args, **kwargs: SimpleNamespace(
        ok=True, reason="", run_dir=tmp_path, stats=stats, metrics=[]))
    with pytest.raises(RuntimeError, match=r"e2e/respec_fast_kd: messages were rejected \(distiller/0 200\)"):
        rl_runs.run_variants("e2e", {"respec_fast_kd": (tmp_path / "run.yaml", {})}, 3, {}, Console(quiet=True))
    stats["distiller/0"]["rejected"] = 0
    assert rl_runs.run_variants("e2e", {"respec_fast_kd": (tmp_path / "run.yaml", {})}, 3, {}, Console(quiet=True))


def test_each_run_carries_the_gaps_between_its_batches_into_the_e2e_table(tmp_path, monkeypatch):
    """From the run's own log: FastRollouts' batch, the gap before the next, the policy load,
    and the step costs its draft lengths were chosen from."""
    from types import SimpleNamespace

    stamp = lambda at: f"2026-11-27T22:00:{at:09.6f}Z"  # noqa: E731
    events = []
    for batch in range(8):  # each 0.15 s, ending every 0.2 s: a gap of 0.05 s with a load in it
        lengths = {"1": 4, "8": 0} if batch < 5 else {"1": 6, "8": 0}  # the choice moves at batch 5
        events.append({"event": "batch_generated", "seconds": 0.15, "timestamp": stamp(1.0 + 0.2 * batch),
                       "draft_lengths": lengths})
        events.append({"event": "policy_weights_loaded", "load_s": 0.012, "timestamp": stamp(1.02 + 0.2 * batch)})
    events.insert(0, {"event": "draft_lengths_profiled", "choice": {"1": 4, "8": 0}, "cached": False,
                      "step_ms": {"1/0": 0.7, "1/4": 1.9, "8/0": 0.9, "8/4": 2.4}, "timestamp": stamp(0.5)})
    events.insert(1, {"event": "graphs_captured", "pairs": 4, "seconds": 0.3, "timestamp": stamp(0.6)})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    monkeypatch.setattr(rl_runs, "run_file", lambda *args, **kwargs: SimpleNamespace(
        ok=True, reason="", run_dir=tmp_path, stats={}, metrics=[]))
    [result] = rl_runs.run_variants("e2e", {"respec_fast": (tmp_path / "run.yaml", {})}, 3, {}, Console(quiet=True))
    assert result.extra["batch_gaps"]["gap_s"] == pytest.approx(0.05)
    assert rl_runs._between_batches(result) == "0.15 / 0.05 / 0.012"
    assert result.extra["step_costs"] == {"step_ms": {"1/0": 0.7, "1/4": 1.9, "8/0": 0.9, "8/4": 2.4},
                                          "choice": {"1": 4, "8": 0}, "cached": False,
                                          "captured": {"pairs": 4, "seconds": 0.3},
                                          "choice_changes": [[5, {"1": 6, "8": 0}]]}
