"""`placement: ray`: the tiny RL graph on a local Ray instance (CPU, 4 logical CPUs), each
process group a Ray actor talking tcp; its synchronous metrics equal the local run's; a
group SIGKILLed mid-run is restarted by Ray, re-announces its addresses, the run ends with
every step trained once and its metrics still equal the local run's (rows sample from
streams keyed by prompt id, so the samples posed again come out the same); bad placement
settings are refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import yaml

from respec.runtime.graph import ConfigError, load_config
from respec.runtime.launcher import run_file
from tests.runtime.test_rl_run import rl_config, step_rows

ray = pytest.importorskip("ray", reason="placement: ray needs the optional extra respec[ray]")

TIMINGS = {"time_s", "gen_s", "score_s", "train_s", "update_s", "publish_s", "distill_s", "gen_tokens_per_s", "source"}
RAY = {"num_cpus": 4, "groups": {"main": {"num_cpus": 1}, "scoring": {"num_cpus": 0.5},
                                 "trainer": {"num_cpus": 0.5}}}


def ray_config(tmp_path, policy, name: str, steps: int, **ray_keys):
    """The RL test graph (scorer and trainer in their own groups) placed on Ray. Rewards
    are the response length: the tiny random policy never solves a problem, and rewards
    that differ within a group give real updates (a loss, new weights every step) for the
    runs to agree on."""
    path = rl_config(tmp_path, policy, name, steps=steps, scorer_group="scoring")
    config = yaml.safe_load(path.read_text())
    config["actors"]["trainer"]["group"] = "trainer"
    config["actors"]["scorer"]["params"]["reward_fn"] = "tests.tasks.rewards:length_reward"
    config["run"].update(placement="ray", transport="tcp")
    config["ray"] = {**RAY, **ray_keys}
    path.write_text(yaml.safe_dump(config))
    return path


def local_twin(ray_path, tmp_path, name: str):
    config = yaml.safe_load(ray_path.read_text())
    config["run"].update(name=name, placement="local", transport="ipc")
    del config["ray"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def assert_same_metrics(got, expected):
    """Every key but timings equal; floats to 1e-5 relative (1e-6 absolute, for losses near
    0). Why any slack: a row generated again after a kill may share its forward passes with
    other rows than the first time, and a BLAS kernel may then sum in another order (float32
    logits move by ~1e-7 relative; behaviour log-probs, losses and the next weights with
    them). Tokens, rewards, lengths, groups and versions must be equal: a token changes only
    if its uniform falls within that ~1e-7 of a CDF boundary, and then the test fails."""
    got, expected = without_timings(got), without_timings(expected)
    assert [sorted(row) for row in got] == [sorted(row) for row in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for key, value in mine.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
            else:
                assert value == theirs[key], (mine["step"], key)


KILL_STEPS = 6


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, policy_dir):
    """The metrics of the Ray runs' local twin (placement local, ipc), KILL_STEPS steps. A
    synchronous run's step k depends on steps 1..k only, so a shorter run is its prefix."""
    tmp_path = tmp_path_factory.mktemp("local")
    local = run_file(local_twin(ray_config(tmp_path, policy_dir, "twin", steps=KILL_STEPS), tmp_path, "local"),
                     progress=False)
    assert local.ok, local.reason
    return step_rows(local.run_dir)


def test_synchronous_metrics_on_ray_equal_the_local_run(tmp_path, policy_dir, local_rows):
    placed = ray_config(tmp_path, policy_dir, "on_ray", steps=3)
    on_ray = run_file(placed, progress=False)
    assert on_ray.ok, on_ray.reason
    a = step_rows(on_ray.run_dir)
    assert [r["groups"] for r in a] == [[0, 1], [2, 3], [4, 5]]
    assert without_timings(a) == without_timings(local_rows[:3])  # rewards, lengths, losses, versions: all of it
    log = [json.loads(line) for line in (on_ray.run_dir / "log.jsonl").read_text().splitlines()]
    starts = [e for e in log if e["event"] == "group_started"]
    assert {e["process"] for e in starts} == {"main", "scoring", "trainer"}
    assert all(e.get("placement") == "ray" for e in starts) and len({e["pid"] for e in starts}) == 3
    assert not ray.is_initialized()  # the local instance the run started is gone


def test_a_group_killed_mid_run_is_restarted_by_ray_and_the_metrics_are_the_local_runs(
        tmp_path, policy_dir, local_rows):
    ray.init(num_cpus=4, namespace="respec", include_dashboard=False, log_to_driver=False)
    try:
        placed = ray_config(tmp_path, policy_dir, "killed", steps=KILL_STEPS)
        run_dir = tmp_path / "runs" / "killed"
        killed: dict[str, int] = {}
        killer = threading.Thread(target=_kill_scoring_after_two_steps, args=(run_dir, killed))
        killer.start()
        result = run_file(placed, progress=False)
        killer.join()
    finally:
        ray.shutdown()
    assert killed, "the scoring group was never killed"
    assert result.ok, result.reason
    steps = step_rows(run_dir)
    assert [r["step"] for r in steps] == list(range(1, KILL_STEPS + 1))
    assert [r["policy_version"] for r in steps] == list(range(1, KILL_STEPS + 1))
    assert [r["groups"] for r in steps] == [[2 * i, 2 * i + 1] for i in range(KILL_STEPS)]
    # The groups in flight at the kill were posed again and generated again; each row
    # samples from its own stream (keyed by its prompt id), so they came out as the first
    # time and the trainer saw the local run's data.
    assert_same_metrics(steps, local_rows)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    restarted = [e for e in log if e["event"] == "group_started" and e["process"] == "scoring"]
    assert len(restarted) == 2 and restarted[1]["pid"] != killed["pid"]  # a new process, by Ray
    assert any(e["event"] == "group_restarted" and e.get("group") == "scoring" for e in log)
    # what was in flight was posed again and generated again: the equality above is not idle
    assert any(e["event"] == "posing_again" and e["groups"] and e.get("after") == "scoring" for e in log)


def _kill_scoring_after_two_steps(run_dir, killed: dict[str, int]) -> None:
    """SIGKILL the scoring group's process (found in the run's address book) once two
    metrics rows exist, as a crashing node or the OOM killer would."""
    deadline = time.time() + 180
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            books = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("respec-killed-addresses")]
            book = ray.get_actor(books[0]["name"], namespace=books[0]["namespace"])
            killed["pid"] = ray.get(book.pids.remote())["scoring"]
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("change, message", [
    ({"run": {"transport": "ipc"}}, "run.transport: placement: ray needs transport: tcp"),
    ({"ray": {"groups": {"nowhere": {"num_cpus": 1}}}}, "ray.groups.nowhere: no actor is in process group"),
    ({"ray": {"groups": {"main": {"num_cpus": 0}}}}, "ray.groups.main: num_cpus/num_gpus"),
    ({"ray": {"adress": "auto"}}, "ray.adress: unknown key"),
])
def test_bad_ray_settings_are_refused_by_key(tmp_path, policy_dir, change, message):
    config = yaml.safe_load(ray_config(tmp_path, policy_dir, "bad", steps=1).read_text())
    for section, values in change.items():
        config[section] = {**config[section], **values} if section == "run" else values
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_cluster_too_small_for_the_groups_is_refused_before_anything_starts(tmp_path, policy_dir):
    config = yaml.safe_load(ray_config(tmp_path, policy_dir, "small", steps=1).read_text())
    config["ray"]["groups"]["main"] = {"num_cpus": 16}
    config["run"]["startup_timeout_s"] = 3
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"ray: the process groups need .*'CPU': 16"):
        run_file(path, progress=False)
    assert not ray.is_initialized()  # the instance it started is stopped again
