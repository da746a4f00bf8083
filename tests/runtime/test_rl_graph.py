"""The RL loop's actors wired together: prompts -> rollouts (SD) -> rewards -> GRPO updates ->
new policy versions back to the Verifier, with the staleness bound."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("trainer_group", ["main", "trainer"])
def test_rl_loop_trains_and_swaps_policy_versions(run_graph, policy_dir, trainer_group):
    path = str(policy_dir)
    result = run_graph({
        "prompts": {"class": "respec.actors.prompt_source.PromptSource",
                    "params": {"tokenizer_path": path, "group_size": 4, "groups_per_step": 2, "max_staleness": 1,
                               "max_new_tokens": 12}},
        "generator": {"class": "respec.actors.generator.Generator", "params": {"max_rows": 8}},
        "verifier": {"class": "respec.actors.verifier.Verifier",
                     "params": {"model_path": path, "max_rows": 8, "max_len": 64}},
        "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "params": {"tokenizer_path": path}},
        "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer", "group": trainer_group,
                    "params": {"model_path": path, "group_size": 4, "groups_per_step": 2, "lr": 1e-3,
                               "max_steps": 3}},
    }, name=f"rl_{trainer_group}")
    assert result.ok, result.reason
    steps = [row for row in result.metrics if row["source"] == "trainer/0"]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all(0 <= row["staleness_mean"] <= 1 for row in steps)  # bounded by max_staleness
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    loaded = [e["version"] for e in log if e["event"] == "policy_weights_loaded"]
    assert loaded[:2] == [1, 2]  # the Verifier swapped in each new version


def test_checker_that_raises_or_hangs_scores_zero_and_no_rollout_is_lost(run_graph, policy_dir, tmp_path):
    out = tmp_path / "scores.json"
    responses = ["3+4=7;A:7", "boom", "hang", "A:8"]
    result = run_graph({
        "rollouts": {"class": "tests.runtime.sd_actors.RolloutsFromText",
                     "params": {"tokenizer_path": str(policy_dir), "responses": responses}},
        "scorer": {"class": "respec.actors.reward_scorer.RewardScorer",
                   "params": {"tokenizer_path": str(policy_dir), "reward_fn": "tests.tasks.rewards:moody_reward",
                              "timeout_s": 0.5}},
        "sink": {"class": "tests.runtime.sd_actors.ScoreFile", "params": {"out_file": str(out), "expected": 4}},
    }, name="scorer")
    assert result.ok, result.reason
    scores = json.loads(out.read_text())
    assert scores["r0"] == {"reward": 1.0, "correct": True, "error": ""}
    assert scores["r1"]["reward"] == 0.0 and "checker raised RuntimeError: the checker broke" in scores["r1"]["error"]
    assert scores["r2"]["reward"] == 0.0 and "timed out after 0.5s" in scores["r2"]["error"]
    assert scores["r3"] == {"reward": 0.0, "correct": False, "error": ""}
    assert result.stats["scorer/0"]["restarts"] == 0


def distill_graph(path: str, distiller_group: str = "distiller", **distiller) -> dict:
    return {
        "prompts": {"class": "respec.actors.prompt_source.PromptSource",
                    "params": {"tokenizer_path": path, "group_size": 4, "groups_per_step": 2, "max_staleness": 1,
                               "max_new_tokens": 12}},
        "generator": {"class": "respec.actors.generator.Generator",
                      "params": {"max_rows": 8, "drafter": "eagle", "model_path": path, "shape": "s2_t1_n2"}},
        "verifier": {"class": "respec.actors.verifier.Verifier",
                     "params": {"model_path": path, "max_rows": 8, "max_len": 64}},
        "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "params": {"tokenizer_path": path}},
        "distiller": {"class": "respec.actors.draft_distiller.DraftDistiller", "group": distiller_group,
                      "params": {"model_path": path, "heldout_prompts": 2, "min_buffer": 4, "steps_per_update": 2,
                                 "batch_size": 4, "eval_max_new_tokens": 8, **distiller}},
        "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer", "group": "trainer",
                    # Enough steps that generation is still running when the first draft
                    # update lands (it needs min_buffer rollouts, then its own time).
                    "params": {"model_path": path, "group_size": 4, "groups_per_step": 2, "lr": 1e-3,
                               "max_steps": 8}},
    }


def test_draft_distiller_follows_the_policy_and_the_generator_swaps_its_head(run_graph, policy_dir):
    result = run_graph(distill_graph(str(policy_dir)), name="rl_distill", threads_per_group=1)
    assert result.ok, result.reason
    updates = [row for row in result.metrics if row["source"] == "distiller/0"]
    assert updates and [row["draft_version"] for row in updates] == list(range(1, len(updates) + 1))
    assert all(row["heldout_accept_before"] >= 1.0 and row["distill_s"] > 0 for row in updates)
    assert all(0 < row["distill_heldout_s"] < row["distill_s"] for row in updates)  # the rest: the steps
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["version"] for e in log if e["event"] == "draft_weights_loaded"][:1] == [1]


def test_a_niced_distiller_sharing_a_process_is_refused(run_graph, policy_dir):
    from respec.runtime.graph import ConfigError

    with pytest.raises(ConfigError, match="params.nice 10 would lower the priority of generator, prompts, scorer"):
        run_graph(distill_graph(str(policy_dir), distiller_group="main", nice=10), name="rl_distill_nice")


@pytest.mark.parametrize("params, problem", [
    ({"heldout_measure": "sampled"}, "params.heldout_measure must be one of engine, expected, got 'sampled'"),
    ({"heldout_temperature": -1.0}, "params.heldout_temperature must be >= 0, got -1.0"),
])
def test_a_distiller_with_a_bad_heldout_measure_is_refused(run_graph, policy_dir, params, problem):
    from respec.runtime.graph import ConfigError

    with pytest.raises(ConfigError, match=re.escape(problem)):
        run_graph(distill_graph(str(policy_dir), **params), name="rl_distill_bad")


def started_distiller(policy_dir, tmp_path, samples: int = 4, **params):
    """A DraftDistiller outside a graph, started, its buffer holding `samples` rollouts."""
    import asyncio
    from types import SimpleNamespace

    import structlog

    from respec.actors.draft_distiller import DraftDistiller
    from respec.rl.distill import Sequence

    actor = DraftDistiller(DraftDistiller.Params(model_path=str(policy_dir), weights_dir=str(tmp_path / "draft"),
                                                 **params),
                           SimpleNamespace(instance="distiller/0", log=structlog.get_logger()))
    asyncio.run(actor.on_start())
    for index in range(samples):
        actor.buffer.add(Sequence([1, 5, 6, 7, 8], 2, 1.0, f"g{index}", 0))
    return actor


def saved_policy(policy_dir, tmp_path, version: int):
    """PolicyWeights(version) as a file: the policy with its final norm's gains all `version`."""
    from safetensors.torch import save_file

    from respec.engine.checkpoint import load_model
    from respec.messages import PolicyWeights, WeightsHandle

    policy = load_model(policy_dir)
    with torch.no_grad():
        policy.model.norm.weight.fill_(float(version))
    path = tmp_path / f"policy-v{version}.safetensors"
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, path)
    return PolicyWeights(version=version, handle=WeightsHandle(kind="file", location=str(path)))


def test_a_distiller_loads_only_the_versions_its_updates_start_from_and_skips_gone_or_torn_ones(
        policy_dir, tmp_path, monkeypatch):
    """The policy copy serves updates alone, so only a version an update is due at is
    loaded. One whose file the trainer has deleted, or whose cuda_ipc buffers it wrote over
    mid-copy (TornWeights), is skipped, not an error: newer versions are queued after it."""
    import asyncio
    import contextlib

    from respec.actors import draft_distiller
    from respec.messages import PolicyWeights, WeightsHandle
    from respec.runtime.weights_transfer import TornWeights

    actor = started_distiller(policy_dir, tmp_path, update_interval=2, min_buffer=2, heldout_prompts=0)
    loads, updates, real = [], [], draft_distiller.loaded_tensors

    @contextlib.contextmanager
    def loaded(handle, version, device="cpu"):
        loads.append(version)
        with real(handle, version, device=device) as tensors:
            yield tensors
        if version == 3:
            raise TornWeights("v3: written over during the copy")

    async def update(policy_version):
        updates.append((policy_version, float(actor.policy.model.norm.weight[0].detach())))
        actor.updated_at = policy_version

    monkeypatch.setattr(draft_distiller, "loaded_tensors", loaded)
    actor._update = update
    gone = PolicyWeights(version=2, handle=WeightsHandle(kind="file", location=str(tmp_path / "policy-v2.safetensors")))

    async def scenario():
        loop = asyncio.create_task(actor.run())
        for weights in (saved_policy(policy_dir, tmp_path, 1), gone, *(saved_policy(policy_dir, tmp_path, v)
                                                                        for v in (3, 4, 5))):
            await actor.on_policy(weights, None)
            await asyncio.sleep(0.2)  # the run loop loads (or skips) it before the next comes
        loop.cancel()

    asyncio.run(scenario())
    assert loads == [2, 3, 4]  # v1: no update due yet; v5: one version after the update at v4
    assert updates == [(4, 4.0)]  # from v4's weights, not the torn v3's
    assert actor.policy_version == 5
    asyncio.run(actor.on_stop())


def test_a_distiller_takes_samples_and_announcements_while_an_update_runs(policy_dir, tmp_path):
    """An update runs off the actor's event loop: a handler that waited seconds for it
    would let the scorer's sends fill this inbox and block, stalling the RL loop."""
    import asyncio
    import threading

    from respec.messages import DistillSample

    actor = started_distiller(policy_dir, tmp_path, update_interval=5, min_buffer=2, heldout_prompts=0)
    running, release, sent = threading.Event(), threading.Event(), []

    def blocked_distil(pool, heldout):
        running.set()
        assert release.wait(10), "the handlers never ran while the update did"
        return 1.0, 1.0, [0.5], 0.1

    async def send(message, **fields):
        sent.append(message)

    actor._distil, actor.send, actor.report = blocked_distil, send, lambda *args, **kwargs: None

    async def scenario():
        loop = asyncio.create_task(actor.run())
        await actor.on_policy(saved_policy(policy_dir, tmp_path, 5), None)  # due: 5 versions since 0
        while not running.is_set():
            await asyncio.sleep(0.01)
        await actor.on_sample(DistillSample(prompt_id="g9/0", tokens=np.array([1, 5, 6, 7], dtype=np.int32),
                                            response_start=2, reward=1.0, policy_version=1), None)
        await actor.on_policy(saved_policy(policy_dir, tmp_path, 6), None)
        assert len(actor.buffer.samples) == 5 and actor.policy_version == 6  # handled mid-update
        release.set()
        while not sent and not loop.done():
            await asyncio.sleep(0.01)
        assert not loop.done(), loop.exception()  # the update's own error, had it blocked the loop
        loop.cancel()

    asyncio.run(scenario())
    assert [m.version for m in sent] == [1] and actor.updated_at == 5
    asyncio.run(actor.on_stop())


def test_a_distiller_measuring_expected_acceptance_uses_the_heldout_rollouts(policy_dir, tmp_path, monkeypatch):
    """heldout_measure: expected scores the held-out prompts' rollouts (never trained on)
    with expected_acceptance, at heldout_temperature and eval_shape's depth; engine (the
    default) generates from the held-out prompts."""
    import asyncio

    from respec.actors import draft_distiller
    from respec.rl.distill import Sequence

    seen = {}

    def expected(policy, head, rollouts, draft_len, temperature):
        seen.update(rollouts=[r.tokens for r in rollouts], draft_len=draft_len, temperature=temperature)
        return 1.5

    monkeypatch.setattr(draft_distiller, "expected_acceptance", expected)
    actor = started_distiller(policy_dir, tmp_path, samples=0, heldout_prompts=1, heldout_measure="expected",
                              heldout_temperature=0.7, eval_shape="s3_t1_n3", steps_per_update=1, batch_size=2)
    for tokens in ([1, 2, 9, 9], [1, 2, 8, 8], [3, 4, 5, 6], [3, 4, 6, 6]):
        actor.buffer.add(Sequence(tokens, 2, 1.0, "g0", 0))
    before, after, losses, heldout_s = actor._distil(list(actor.buffer.samples), actor._heldout())
    assert seen == {"rollouts": [[1, 2, 9, 9], [1, 2, 8, 8]], "draft_len": 3, "temperature": 0.7}
    assert (before, after, len(losses)) == (1.5, 1.5, 1) and heldout_s > 0
    assert [s.tokens for s in actor.buffer.samples] == [[3, 4, 5, 6], [3, 4, 6, 6]]  # what it trained on
    asyncio.run(actor.on_stop())
