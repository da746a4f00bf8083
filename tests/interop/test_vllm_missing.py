"""Choosing the vLLM backend without vLLM installed, or with actors beside it that it
leaves nothing to do for, is a clear error before anything starts. Runs in .venv (no
vLLM) and in .venv-vllm alike: the missing module is simulated by failing its import."""

from __future__ import annotations

import builtins
import importlib.util

import pytest
import yaml

from respec.interop import vllm_engine
from respec.runtime.graph import ConfigError, load_config
from respec.runtime.plan import build_plan

ROLLOUTS = {"class": "respec.actors.vllm_rollouts.VllmRollouts", "params": {"model_path": "models/tiny/policy"}}
TASK = {"task": "arithmetic", "task_params": {"max_value": 9}}


@pytest.fixture
def no_vllm(monkeypatch):
    """`import vllm` fails and no vllm module can be found, as in a venv without it."""
    real_import, real_find_spec = builtins.__import__, importlib.util.find_spec

    def failing_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))


def plan(tmp_path, actors: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "v"}, "actors": actors}))
    return build_plan(load_config(path), str(path))


def graph(**extra) -> dict:
    return {
        "prompts": {"class": "respec.actors.prompt_source.PromptSource",
                    "params": {**TASK, "tokenizer_path": "models/tiny/policy", "group_size": 2, "groups_per_step": 1}},
        "generator": ROLLOUTS,
        "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "params": {**TASK, "tokenizer_path": "x"}},
        "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer",
                    "params": {**TASK, "model_path": "x", "group_size": 2, "groups_per_step": 1}},
        **extra,
    }


def test_building_an_engine_without_vllm_says_how_to_install_it(no_vllm):
    with pytest.raises(ImportError) as error:
        vllm_engine.VllmEngine(vllm_engine.EngineOptions(model_path="models/tiny/policy"))
    message = str(error.value)
    assert "make vllm-env" in message and "pip install 'respec[vllm]'" in message and "transformers<5.20" in message


def test_a_graph_with_the_vllm_backend_fails_its_plan_without_vllm(tmp_path, no_vllm):
    with pytest.raises(ConfigError) as error:
        plan(tmp_path, graph())
    assert "actors.generator: class: backend vllm needs vLLM" in str(error.value)
    assert "make vllm-env" in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the plan's vLLM check needs vllm found")
def test_a_vllm_graph_plans_where_vllm_is_installed(tmp_path):
    assert "generator" in plan(tmp_path, graph()).actors


@pytest.mark.parametrize("name, spec, says", [
    ("distiller", {"class": "respec.actors.draft_distiller.DraftDistiller", "params": {"model_path": "x"}},
     "distils respec's drafter"),
    ("scheduler", {"class": "respec.actors.scheduler.Scheduler"}, "picks respec's draft shapes"),
    ("native", {"class": "respec.actors.generator.Generator"}, "replaces the Generator + Verifier pair"),
])
def test_actors_of_respecs_own_sd_loop_are_refused_beside_vllm(tmp_path, name, spec, says):
    verifier = {"class": "respec.actors.verifier.Verifier", "params": {"model_path": "x"}}  # the Generator's peer
    with pytest.raises(ConfigError) as error:
        plan(tmp_path, graph(**{name: spec}, **({"verifier": verifier} if name == "native" else {})))
    assert f"actors.generator: actors.{name} (" in str(error.value) and says in str(error.value)
