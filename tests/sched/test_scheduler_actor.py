"""The Scheduler actor in a graph: decides from GenerationStats, sends SchedulerDecisions
only when the config changes, and refuses bad parameters before the run starts."""

from __future__ import annotations

import json

import pytest

from respec.runtime.graph import ConfigError
from tests.sched.test_cost_model import synthetic_profile, synthetic_time

ACCEPT = {"nosd": 1.0, "s2_t1_n2": 2.5, "s4_t1_n4": 3.5}


def stats(config: str, batch: int, context: float = 16.0) -> dict:
    return {"active_rows": batch, "waiting_prompts": 0, "config": config,
            "step_time_s": synthetic_time(config, batch, context), "tokens_emitted": int(batch * ACCEPT[config]),
            "mean_accept_len": ACCEPT[config], "context_len_mean": context}


def graph(tmp_path, script: list[dict], expected: int, **scheduler_params) -> dict:
    (tmp_path / "stats.json").write_text(json.dumps(script))
    return {
        "stats": {"class": "tests.sched.sched_actors.ScriptedStats",
                  "params": {"stats_file": str(tmp_path / "stats.json")}},
        "scheduler": {"class": "respec.actors.scheduler.Scheduler", "params": scheduler_params},
        "sink": {"class": "tests.sched.sched_actors.DecisionFile",
                 "params": {"out_file": str(tmp_path / "decisions.json"), "expected": expected}},
    }


def test_scheduler_switches_to_sd_when_the_batch_shrinks(run_graph, tmp_path):
    profile = synthetic_profile().save(tmp_path / "profile.json")
    # plain decoding runs at batch 64 (s4 predicted 14% slower: not worth exploring at
    # probe_within 0.1); the batch falls to 1, plain decoding is measured there, and s4,
    # predicted 2.5x faster, is tried
    script = [stats("nosd", 64)] * 4 + [stats("nosd", 1)] * 4
    actors = graph(tmp_path, script, expected=2, profile=str(profile), candidates=["s4_t1_n4"],
                   margin=0.05, patience=2, probe_within=0.1)
    result = run_graph(actors, name="sched_switch")
    assert result.ok, result.reason
    first, second = json.loads((tmp_path / "decisions.json").read_text())
    assert (first["speculate"], first["batch_size"]) == (False, 64)
    assert (second["speculate"], second["steps"], second["branch"], second["num_draft"]) == (True, 4, 1, 4)
    assert second["batch_size"] == 1 and "explore s4_t1_n4" in second["reason"]
    assert set(second["predicted_tokens_per_s"]) == {"nosd", "s4_t1_n4"}
    assert second["decision_id"] == 2


def test_scheduler_without_a_profile_learns_that_sd_does_not_pay(run_graph, tmp_path):
    """No profile: the prior says SD pays at batch 4; live SD steps 4x slower than it
    predicts, with acceptance 1.1, turn the decision to plain decoding."""
    slow = [{**stats("s2_t1_n2", 4), "step_time_s": 1.0, "mean_accept_len": 1.1}] * 8
    actors = graph(tmp_path, [stats("s2_t1_n2", 4)] + slow, expected=2, candidates=["s2_t1_n2"], patience=2)
    result = run_graph(actors, name="sched_prior")
    assert result.ok, result.reason
    first, second = json.loads((tmp_path / "decisions.json").read_text())
    assert first["speculate"] and not second["speculate"]


@pytest.mark.parametrize("params, message", [
    ({"margin": -1.0}, "params.margin: -1.0 is negative"),
    ({"patience": 0}, "params.patience: 0"),
    ({"ema": 0.0}, "params.ema: 0.0; a weight in (0, 1]"),
    ({"candidates": ["s4_t1"]}, "params.candidates: DraftShape: 's4_t1' is not of the form"),
    ({"profile": "/nonexistent/profile.json"}, "params.profile: '/nonexistent/profile.json' does not exist"),
    ({"probe_within": 1.5}, "params.probe_within: 1.5; a relative slowdown in [0, 1)"),
    ({"min_dwell": -2}, "params.min_dwell: -2; 0 or more decisions"),
    ({"explore_steps": 0}, "params.explore_steps: 0; at least 1 step"),
    ({"visit_budget": -0.1}, "params.visit_budget: -0.1; a share of a bucket visit's time"),
    ({"visit_floor_steps": -1.0}, "params.visit_floor_steps: -1.0; 0 or more steps"),
    ({"margin": "big"}, "margin"),
])
def test_bad_params_stop_the_run_before_it_starts_with_the_key_named(run_graph, tmp_path, params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_graph(graph(tmp_path, [], expected=1, **params), name="sched_bad")


def test_candidates_missing_from_the_profile_are_named(run_graph, tmp_path):
    profile = synthetic_profile().save(tmp_path / "profile.json")
    with pytest.raises(ConfigError, match="params.candidates: s6_t1_n6 not profiled"):
        run_graph(graph(tmp_path, [], expected=1, profile=str(profile), candidates=["s6_t1_n6"]), name="sched_missing")
