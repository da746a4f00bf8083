"""The profiler on a tiny random model: the grid it measures, the file it writes, the
model a Scheduler builds from it; the bench's rollout loop with the adaptive rule."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from respec.bench.adaptive import Adaptive, Static, long_tail_budgets, rollout
from respec.engine.checkpoint import load_model
from respec.engine.drafters.ngram import NgramDrafter
from respec.sched.cost_model import CostModel
from respec.sched.policy import SchedulerPolicy
from respec.sched.profile import Profile, profile, profile_key
from respec.sched.setup import ModelSetup, build_drafter, setup_from_run_config
from tests.checkpoints import small_qwen2

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_qwen2(tmp_path_factory.mktemp("ckpt") / "model")


def test_profile_measures_the_grid_and_round_trips_through_json(tmp_path, checkpoint):
    model = load_model(checkpoint)
    key = profile_key(checkpoint, "ngram", None, "cpu")
    prompts = [torch.tensor([1, 2, 3, 1, 2, 3, 1]), torch.tensor([5, 6, 5, 6])]
    measured = profile(model, NgramDrafter(), key, ("s2_t1_n2",), (1, 2), (8, 24), accept_prompts=(prompts, ()),
                       repeats=2, warmup=1)
    grid = {(p.config, p.batch, p.context) for p in measured.points}
    assert grid == {(c, b, ctx) for c in ("nosd", "s2_t1_n2") for b in (1, 2) for ctx in (8, 24)}
    assert all(p.step_s > 0 and len(p.samples_s) == 2 for p in measured.points)
    assert 1.0 <= measured.accept_len["s2_t1_n2"] <= 3.0
    loaded = Profile.load(measured.save(tmp_path / "p.json"))
    assert loaded.points == measured.points and loaded.accept_len == measured.accept_len
    assert loaded.key["model_config_hash"] and loaded.key["device"].startswith("cpu")
    assert loaded.matches(key) == [] and loaded.matches({**key, "device": "gpu"})
    assert CostModel.build(["s2_t1_n2"], loaded).tokens_per_s("s2_t1_n2", 2, 10) > 0


def test_a_file_that_is_not_a_profile_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a respec profile"):
        Profile.load(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="respec profile"):
        Profile.load(tmp_path / "missing.json")


def test_profile_setup_comes_from_the_run_file(tmp_path, checkpoint):
    run = {"run": {"name": "x"}, "actors": {
        "generator": {"class": "respec.actors.generator.Generator", "params": {"drafter": "ngram"}},
        "verifier": {"class": "respec.actors.verifier.Verifier", "params": {"model_path": str(checkpoint)}}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    setup = setup_from_run_config(tmp_path / "run.yaml")
    assert (setup.model_path, setup.drafter) == (str(checkpoint), "ngram")
    assert isinstance(build_drafter(setup, None), NgramDrafter)
    with pytest.raises(ValueError, match="unknown drafter 'magic'"):
        build_drafter(ModelSetup(str(checkpoint), "magic"), None)


def test_bench_rollout_with_the_adaptive_rule_emits_what_plain_decoding_emits(checkpoint):
    model, drafter = load_model(checkpoint), NgramDrafter()
    prompts = [torch.tensor(p) for p in ([1, 2, 3, 1, 2, 3, 1], [5, 6, 5, 6], [7, 8, 9, 7, 8], [3, 3, 3])]
    budgets = long_tail_budgets(len(prompts), seed=1, median=10, high=24)
    plain = rollout(model, None, prompts, budgets, 3, (), Static("nosd"))
    policy = SchedulerPolicy(CostModel.build(["s2_t1_n2", "s4_t1_n4"]), ["s2_t1_n2", "s4_t1_n4"], patience=1)
    adaptive = rollout(model, drafter, prompts, budgets, 3, (), Adaptive(policy))
    assert adaptive["outputs"] == plain["outputs"]
    assert [len(tokens) for tokens in plain["outputs"]] == budgets
    assert sum(adaptive["configs_used"].values()) == adaptive["steps"]
