"""`placement: ray`: the tiny RL graph on a local Ray instance (CPU, 4 logical CPUs), each
process group a Ray actor talking tcp; its synchronous metrics equal the local run's; a
group SIGKILLed mid-run is restarted by Ray, re-announces its addresses and the run ends
with every step trained once; bad placement settings are refused before anything starts."""

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
from tests.runtime.test_rl_graph import policy_dir  # noqa: F401 - the tiny random policy fixture
from tests.runtime.test_rl_run import rl_config, step_rows

ray = pytest.importorskip("ray", reason="placement: ray needs the optional extra respec[ray]")

TIMINGS = {"time_s", "gen_s", "score_s", "train_s", "distill_s", "gen_tokens_per_s", "source"}
RAY = {"num_cpus": 4, "groups": {"main": {"num_cpus": 1}, "scoring": {"num_cpus": 0.5},
                                 "trainer": {"num_cpus": 0.5}}}


def ray_config(tmp_path, policy, name: str, steps: int, **ray_keys):
    """The RL test graph (scorer and trainer in their own groups) placed on Ray."""
    path = rl_config(tmp_path, policy, name, steps=steps, scorer_group="scoring")
    config = yaml.safe_load(path.read_text())
    config["actors"]["trainer"]["group"] = "trainer"
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


def test_synchronous_metrics_on_ray_equal_the_local_run(tmp_path, policy_dir):  # noqa: F811
    placed = ray_config(tmp_path, policy_dir, "on_ray", steps=3)
    on_ray = run_file(placed, progress=False)
    assert on_ray.ok, on_ray.reason
    local = run_file(local_twin(placed, tmp_path, "local"), progress=False)
    assert local.ok, local.reason
    a, b = step_rows(on_ray.run_dir), step_rows(local.run_dir)
    assert [r["groups"] for r in a] == [[0, 1], [2, 3], [4, 5]]
    assert without_timings(a) == without_timings(b)  # rewards, lengths, losses, versions: all of it
    log = [json.loads(line) for line in (on_ray.run_dir / "log.jsonl").read_text().splitlines()]
    starts = [e for e in log if e["event"] == "group_started"]
    assert {e["process"] for e in starts} == {"main", "scoring", "trainer"}
    assert all(e.get("placement") == "ray" for e in starts) and len({e["pid"] for e in starts}) == 3
    assert not ray.is_initialized()  # the local instance the run started is gone


def test_a_group_killed_mid_run_is_restarted_by_ray_and_rejoins(tmp_path, policy_dir):  # noqa: F811
    ray.init(num_cpus=4, namespace="respec", include_dashboard=False, log_to_driver=False)
    try:
        placed = ray_config(tmp_path, policy_dir, "killed", steps=6)
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
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["policy_version"] for r in steps] == list(range(1, 7))
    # The data order and the versions are the local synchronous run's. The sampled values
    # after the restart are not: the groups in flight are posed again and sampled from the
    # verifier's moved-on random stream. The synchronous bound holds exactly: prompts carry
    # the oldest policy version that may generate them (docs/RUNTIME.md, the staleness race).
    assert [r["groups"] for r in steps] == [[2 * i, 2 * i + 1] for i in range(6)]
    assert all(r["staleness_max"] == 0 for r in steps)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    restarted = [e for e in log if e["event"] == "group_started" and e["process"] == "scoring"]
    assert len(restarted) == 2 and restarted[1]["pid"] != killed["pid"]  # a new process, by Ray
    assert any(e["event"] == "group_restarted" and e.get("group") == "scoring" for e in log)


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
def test_bad_ray_settings_are_refused_by_key(tmp_path, policy_dir, change, message):  # noqa: F811
    config = yaml.safe_load(ray_config(tmp_path, policy_dir, "bad", steps=1).read_text())
    for section, values in change.items():
        config[section] = {**config[section], **values} if section == "run" else values
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_cluster_too_small_for_the_groups_is_refused_before_anything_starts(tmp_path, policy_dir):  # noqa: F811
    config = yaml.safe_load(ray_config(tmp_path, policy_dir, "small", steps=1).read_text())
    config["ray"]["groups"]["main"] = {"num_cpus": 16}
    config["run"]["startup_timeout_s"] = 3
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"ray: the process groups need .*'CPU': 16"):
        run_file(path, progress=False)
    assert not ray.is_initialized()  # the instance it started is stopped again
