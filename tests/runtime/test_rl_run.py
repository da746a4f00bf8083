"""A whole RL run as a user runs it: metrics, summary and report; determinism in synchronous
mode; SIGKILL of the run and --resume; SIGKILL of one actor process mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from respec.runtime.launcher import run_file
from respec.runtime.trace_report import _load, _trace_files

STEP_KEYS = {"step", "policy_version", "draft_version", "reward_mean", "accuracy", "response_len", "accept_len",
             "gen_tokens_per_s", "staleness_mean", "gen_s", "score_s", "train_s", "update_s", "publish_s", "distill_s",
             "groups"}


def rl_config(tmp_path: Path, policy: Path, name: str, steps: int = 4, staleness: int = 0,
              scorer_group: str = "main", checkpoint_every: int = 0, eval_problems: int = 0,
              profile_update: int = 0) -> Path:
    path, task = str(policy), {"task": "arithmetic", "task_params": {"max_value": 9}}
    config = {
        "run": {"name": name, "runs_dir": str(tmp_path / "runs"), "timeout_s": 240, "threads_per_group": 1},
        "actors": {
            "prompts": {"class": "respec.actors.prompt_source.PromptSource",
                        "params": {**task, "tokenizer_path": path, "group_size": 4, "groups_per_step": 2,
                                   "max_staleness": staleness, "max_new_tokens": 12, "eval_problems": eval_problems}},
            "generator": {"class": "respec.actors.generator.Generator", "params": {"max_rows": 8}},
            "verifier": {"class": "respec.actors.verifier.Verifier",
                         "params": {"model_path": path, "max_rows": 8, "max_len": 64}},
            "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "group": scorer_group,
                       "params": {**task, "tokenizer_path": path}},
            "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer",
                        "params": {**task, "model_path": path, "group_size": 4, "groups_per_step": 2, "lr": 1e-3,
                                   "max_steps": steps, "checkpoint_every": checkpoint_every,
                                   "eval_problems": eval_problems, "eval_samples": 2, "eval_max_new_tokens": 12,
                                   "profile_update": profile_update}},
        },
    }
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if "reward_mean" in r), key=lambda r: r["step"])


def test_rl_run_writes_metrics_summary_report_and_checkpoint(tmp_path, policy_dir):
    result = run_file(rl_config(tmp_path, policy_dir, "full", steps=3, eval_problems=8, profile_update=2),
                      progress=False)
    assert result.ok, result.reason
    steps = step_rows(result.run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3] and all(STEP_KEYS <= set(r) for r in steps)
    assert all(abs(r["update_s"] + r["publish_s"] - r["train_s"]) < 1e-6 for r in steps)
    profile = (result.run_dir / "update_profile.txt").read_text()  # the second update's operators
    assert "aten::" in profile and "Self CPU" in profile
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for key in ("steps", "wall_s", "accuracy_start", "accuracy_end", "reward_start", "reward_end", "accept_len_mean"):
        assert key in summary, key
    assert summary["steps"] == 3 and 0 <= summary["accuracy_start"] <= 1
    assert (result.run_dir / "report.png").stat().st_size > 10_000
    assert (result.run_dir / "checkpoints" / "latest").read_text() == "step-000003"


def test_synchronous_runs_with_one_seed_train_on_the_same_data_in_the_same_order(tmp_path, policy_dir):
    first = run_file(rl_config(tmp_path, policy_dir, "a", steps=3), progress=False)
    second = run_file(rl_config(tmp_path, policy_dir, "b", steps=3), progress=False)
    assert first.ok and second.ok
    a, b = step_rows(first.run_dir), step_rows(second.run_dir)
    assert [r["groups"] for r in a] == [r["groups"] for r in b] == [[0, 1], [2, 3], [4, 5]]
    assert all(r["staleness_mean"] == 0 for r in a + b)  # synchronous: every token from the current policy


def test_a_run_killed_with_sigkill_resumes_as_if_never_killed(tmp_path, policy_dir):
    config = rl_config(tmp_path, policy_dir, "killed", steps=8, checkpoint_every=2)
    run_dir = tmp_path / "runs" / "killed"
    process = subprocess.Popen([sys.executable, "-m", "respec", "run", str(config), "--no-progress"],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not (latest.is_file() and latest.read_text() >= "step-000004") and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and every group process, mid-run
    process.wait()
    assert latest.is_file(), "no checkpoint before the kill"
    resumed = run_file(config, resume=True, progress=False)
    assert resumed.ok, resumed.reason
    steps = step_rows(run_dir)
    assert [r["step"] for r in steps] == [r["policy_version"] for r in steps] == list(range(1, 9))
    assert [r["groups"] for r in steps] == [[2 * i, 2 * i + 1] for i in range(8)]  # the data order, unchanged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].startswith("step-") and summary["steps"] == 8
    # From the trace of both attempts: every trained sample travelled to the trainer as a
    # ScoredRollout under its own id. Sends and receipts both count: the scorer's sends
    # just before the kill may still sit in its process's trace buffer (missed once, under
    # a second test suite's load), while the trainer flushes its receipts with each
    # checkpoint; and the last receipt of the resumed run, whose handler ends the run, is
    # not recorded, while its send is.
    seen = {e.envelope.correlation_id for e in _load(_trace_files(run_dir))
            if e.record.event in ("send", "recv") and e.envelope is not None and e.envelope.type == "ScoredRollout"}
    trained = {f"g{g}/{i}" for r in steps for g in r["groups"] for i in range(4)}
    assert trained <= seen


def test_an_actor_process_killed_mid_run_is_restarted_and_no_rollout_is_lost(tmp_path, policy_dir):
    config = rl_config(tmp_path, policy_dir, "crash", steps=6, staleness=1, scorer_group="scoring")
    run_dir = tmp_path / "runs" / "crash"
    killed = {}

    def kill_scorer_after_step_two() -> None:
        log = run_dir / "log.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            events = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
            pids = [e["pid"] for e in events if e["event"] == "group_started" and e.get("process") == "scoring"]
            metrics = run_dir / "metrics.jsonl"
            if pids and metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
                return
            time.sleep(0.02)

    import threading

    killer = threading.Thread(target=kill_scorer_after_step_two)
    killer.start()
    result = run_file(config, progress=False)
    killer.join()
    assert killed, "the scorer process was never killed"
    assert result.ok, result.reason
    steps = step_rows(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 7))
    groups = [g for r in steps for g in r["groups"]]
    assert len(groups) == len(set(groups)) == 12  # no group trained twice
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "group_restarted" and e.get("group") == "scoring" for e in log)
    assert any(e["event"] == "posing_again" for e in log)  # the groups in flight were posed again
    # The trace accounts for every rollout: each one the generator sent for a trained group
    # (lost in the dead process or not) reached the trainer under its id, and every trained
    # sample did.
    entries = _load(_trace_files(run_dir))
    sent = {e.envelope.correlation_id for e in entries
            if e.record.event == "send" and e.envelope is not None and e.envelope.type == "Rollout"}
    received = {e.envelope.correlation_id for e in entries if e.record.event == "recv" and e.envelope is not None
                and e.envelope.type == "ScoredRollout"}
    trained = {f"g{g}/{i}" for g in groups for i in range(4)}
    assert trained <= received
    assert {r for r in sent if int(r.split("/")[0][1:]) in groups} <= received


def test_the_trainer_process_dying_stops_the_run_and_says_to_resume(tmp_path, policy_dir):
    from respec import log as logging
    from respec.runtime.graph import load_config
    from respec.runtime.launcher import Launcher

    launcher = Launcher(load_config(rl_config(tmp_path, policy_dir, "trainer_dies")), progress=False)
    launcher.serving = True  # as if mid-run
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
    dead.wait()
    launcher._check_alive({"main": dead})
    logging.close()  # the launcher's log file (a real run closes it when it ends)
    assert "died (exit code 9)" in launcher.failure
    assert "it held " in launcher.failure and "trainer" in launcher.failure and "--resume" in launcher.failure
