"""Every way a run file can be wrong gives a message naming the file, the key and the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from respec.runtime.graph import ConfigError, load_config
from respec.runtime.plan import build_plan

ACTORS = "tests.runtime.graph_actors"
GOOD = {
    "run": {"name": "ok"},
    "actors": {
        "sender": {"class": f"{ACTORS}.NumberedSender", "params": {"count": 5}},
        "receiver": {"class": f"{ACTORS}.TickCounter", "group": "other"},
    },
}


def check(tmp_path: Path, raw: dict | str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        build_plan(load_config(path), str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: "), message  # always names the file
    return message


def with_actor(name: str, **spec) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["actors"].setdefault(name, {}).update(spec)
    return raw


def test_the_good_file_plans(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    plan = build_plan(load_config(path), str(path))
    assert plan.groups() == ["main", "other"]


@pytest.mark.parametrize("raw, expected", [
    (with_actor("sender", colour="red"), "actors.sender.colour: unknown key 'colour'"),
    ({**GOOD, "extra": 1}, "extra: unknown key 'extra'"),
    (with_actor("sender", replicas="two"), "actors.sender.replicas: Expected `int`, got `str`"),
    (with_actor("sender", replicas=0), "actors.sender.replicas: must be >= 1"),
    (with_actor("sender", restart={"tries": 3}), "actors.sender.restart.tries: unknown key 'tries'"),
    ({"actors": GOOD["actors"]}, "run: required key is missing"),
    ({"run": {"name": "x"}, "actors": {"a": {"group": "g"}}}, "actors.a.class: required key is missing"),
    ({"run": {"name": "x", "transport": "udp"}, "actors": GOOD["actors"]}, "run.transport: Invalid enum value 'udp'"),
    ({"run": {"name": "x"}, "actors": {}}, "actors: the graph has no actors"),
], ids=["unknown-key", "unknown-top-key", "wrong-type", "bad-replicas", "unknown-nested-key",
        "missing-run", "missing-class", "bad-enum", "no-actors"])
def test_structural_errors(tmp_path, raw, expected):
    assert expected in check(tmp_path, raw)


def test_missing_class(tmp_path):
    message = check(tmp_path, with_actor("receiver", **{"class": f"{ACTORS}.Nope"}))
    assert re.search(r"actors\.receiver\.class: cannot import '.*\.Nope': module '.*' has no 'Nope'", message)
    message = check(tmp_path, with_actor("receiver", **{"class": "no_such_module.Thing"}))
    assert "actors.receiver.class: cannot import 'no_such_module.Thing': No module named" in message
    assert "is not an import path" in check(tmp_path, with_actor("receiver", **{"class": "Thing"}))


def test_class_that_is_not_an_actor(tmp_path):
    message = check(tmp_path, with_actor("receiver", **{"class": f"{ACTORS}.NotAnActor"}))
    assert f"actors.receiver.class: '{ACTORS}.NotAnActor' is not an Actor" in message


def test_wrong_parameter_type_and_unknown_parameter(tmp_path):
    assert "actors.sender.params.count: Expected `int`, got `str`" in check(
        tmp_path, with_actor("sender", params={"count": "many"}))
    assert "actors.sender.params.speed: unknown key 'speed'" in check(
        tmp_path, with_actor("sender", params={"speed": 3}))


def test_handler_for_a_message_nobody_sends(tmp_path):
    raw = {"run": {"name": "x"}, "actors": {"receiver": {"class": f"{ACTORS}.TickCounter"}}}
    message = check(tmp_path, raw)
    assert "actors.receiver: handles Tick, but no actor in the graph sends it" in message
    assert "TickCounter.on_tick would never run" in message


def test_message_sent_that_nobody_handles(tmp_path):
    raw = {"run": {"name": "x"}, "actors": {"sender": {"class": f"{ACTORS}.NumberedSender"}}}
    assert "actors.sender: sends Tick, but no actor in the graph handles it" in check(tmp_path, raw)


def test_request_handled_by_two_actors(tmp_path):
    raw = {"run": {"name": "x"}, "actors": {
        "probe": {"class": f"{ACTORS}.RemoteErrorProbe"},
        "a": {"class": "respec.actors.demo.echo.Echo"},
        "b": {"class": "respec.actors.demo.echo.Echo"},
    }}
    assert "actors.probe: request Ping is handled by a, b; a request needs exactly one" in check(tmp_path, raw)


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in check(tmp_path, "run: [unclosed")
    assert "expected a mapping at the top level" in check(tmp_path, "- a list")
    with pytest.raises(ConfigError, match="no such run file"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_checked_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    with pytest.raises(ConfigError, match="actors.sender.replicas: Expected `int`, got `str`"):
        load_config(path, {"actors.sender.replicas": "x"})
    assert load_config(path, {"run.seed": 7}).run.seed == 7


def test_floats_written_without_a_dot_are_floats_in_files_and_overrides(tmp_path):
    # PyYAML alone reads `1e-1` as the string "1e-1" (YAML 1.1), which the type check refuses.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("  sender:\n", "  sender:\n    restart: {backoff_s: 1e-1}\n"))
    assert load_config(path).actors["sender"].restart.backoff_s == 0.1
    from respec.cli import _overrides

    overrides = _overrides(["actors.sender.restart.backoff_max_s=2E+1", "run.seed=7", "run.name=e5"])
    assert overrides == {"actors.sender.restart.backoff_max_s": 20.0, "run.seed": 7, "run.name": "e5"}
    assert load_config(path, overrides).actors["sender"].restart.backoff_max_s == 20.0


def test_a_null_override_removes_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert sorted(load_config(path, {"actors.receiver": None}).actors) == ["sender"]
    assert load_config(path, {"actors.sender.params.count": None}).actors["sender"].params == {}


@pytest.mark.parametrize("name", ["demo.yaml", "demo_swap.yaml"])
def test_shipped_configs_are_valid(name):
    path = Path(__file__).resolve().parents[2] / "configs" / name
    build_plan(load_config(path), str(path))


def rl_graph(prompts: dict | None = None, trainer: dict | None = None, generator_rows: int = 8) -> dict:
    """The RL loop's actors (their classes load nothing until they start)."""
    return {"run": {"name": "rl"}, "actors": {
        "prompts": {"class": "respec.actors.prompt_source.PromptSource",
                    "params": {"tokenizer_path": "p", "group_size": 4, "groups_per_step": 2, **(prompts or {})}},
        "generator": {"class": "respec.actors.generator.Generator", "params": {"max_rows": generator_rows}},
        "verifier": {"class": "respec.actors.verifier.Verifier", "params": {"model_path": "p", "max_rows": 8}},
        "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "params": {"tokenizer_path": "p"}},
        "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer",
                    "params": {"model_path": "p", "group_size": 4, "groups_per_step": 2, **(trainer or {})}},
    }}


def test_the_rl_graph_plans(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(rl_graph()))
    assert set(build_plan(load_config(path), str(path)).actors) == {"prompts", "generator", "verifier", "scorer",
                                                                    "trainer"}


def test_more_staleness_than_the_trainer_buffers_is_refused(tmp_path):
    message = check(tmp_path, rl_graph(prompts={"max_staleness": 5}, trainer={"buffer_groups": 8}))
    assert "actors.prompts: params.max_staleness 5" in message
    assert "12 groups" in message and "actors.trainer.params.buffer_groups (8)" in message


def test_prompt_source_and_trainer_must_agree_on_the_group_shape(tmp_path):
    message = check(tmp_path, rl_graph(prompts={"group_size": 8}))
    assert "params.group_size is 8 but actors.trainer.params.group_size is 4" in message


def test_generator_rows_must_fit_the_verifier_cache(tmp_path):
    message = check(tmp_path, rl_graph(generator_rows=16))
    assert "actors.generator: params.max_rows 16 is more than actors.verifier.params.max_rows (8)" in message


def test_run_seed_seeds_every_actor_that_takes_one_unless_it_sets_its_own(tmp_path):
    graph = rl_graph(prompts={"seed": 7})
    graph["run"]["seed"] = 3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(graph))
    actors = build_plan(load_config(path), str(path)).actors
    assert actors["prompts"].params.seed == 7  # its own
    assert actors["trainer"].params.seed == 3 and actors["verifier"].params.seed == 3
    assert not hasattr(actors["scorer"].params, "seed")  # takes none, is given none


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_run_file_passes_its_checks(path):
    """configs/*.yaml plan without error (the vLLM one where vLLM is installed)."""
    import importlib.util

    if "vllm" in path.read_text() and importlib.util.find_spec("vllm") is None:
        pytest.skip("the vLLM backend's plan needs vllm importable (.venv-vllm)")
    assert build_plan(load_config(path), str(path)).actors
