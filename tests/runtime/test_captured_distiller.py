"""CapturedDistiller: the head learns from the PolicyTrainer's own forward pass, in its process."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import structlog
import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import EagleHead, TargetParts, layers_to_capture
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.messages import CapturedTargets
from respec.rl.distill import pad_right
from tests.runtime.test_rl_graph import distill_graph


def graph(path: str, distiller_group: str = "trainer", **distiller) -> dict:
    """test_rl_graph's RL graph with a CapturedDistiller for its DraftDistiller."""
    actors = distill_graph(path)
    actors["distiller"] = {"class": "respec.actors.captured_distiller.CapturedDistiller", "group": distiller_group,
                           "params": {"model_path": path, "update_interval": 2, "lr": 1e-3, **distiller}}
    actors["trainer"]["params"]["max_steps"] = 8
    return actors


def test_the_head_learns_from_the_trainers_pass_and_the_generator_swaps_it(run_graph, policy_dir):
    result = run_graph(graph(str(policy_dir)), name="captured")
    assert result.ok, result.reason
    updates = [row for row in result.metrics if row["source"] == "distiller/0"]
    # every 2 versions: the passes of versions 2, 4 and 6 (the last pass, of 7, comes as the run ends)
    assert [row["draft_version"] for row in updates] == [1, 2, 3] and [row["step"] for row in updates] == [2, 4, 6]
    assert all(row["heldout_accept_before"] >= 1.0 and row["distill_messages"] == 2 for row in updates)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["version"] for e in log if e["event"] == "draft_weights_loaded"][:1] == [1]


def test_a_captured_distiller_outside_the_trainers_process_is_refused(run_graph, policy_dir):
    from respec.runtime.graph import ConfigError

    with pytest.raises(ConfigError, match="must share a process group with trainer .group 'trainer'.: "
                                          "CapturedTargets hold device tensors"):
        run_graph(graph(str(policy_dir), distiller_group="main"), name="captured_apart")


def test_a_captured_distiller_on_another_device_than_the_trainer_is_refused(run_graph, policy_dir):
    from respec.runtime.graph import ConfigError

    with pytest.raises(ConfigError, match="params.device 'cuda:0' must be trainer's .'cpu'."):
        run_graph(graph(str(policy_dir), device="cuda:0"), name="captured_device")


def plan_of(actors: dict):
    from respec.runtime.graph import parse_config
    from respec.runtime.plan import build_plan

    return build_plan(parse_config({"run": {"name": "t"}, "actors": actors}))


def test_the_head_travels_as_the_policy_does(policy_dir):
    """run.weights resolved for DraftWeights as for PolicyWeights: cuda_ipc onto the
    Generator's GPU when it is in another process on CUDA (not through the CPU and a file),
    by reference within the process, by file on the CPU."""
    from respec.messages import DraftWeights
    from respec.runtime import weights_route

    def route(generator_group: str, device: str) -> tuple[str, torch.device | None]:
        actors = graph(str(policy_dir))
        actors["generator"]["group"] = generator_group
        actors["generator"]["params"]["device"] = device
        plan = plan_of(actors)
        trainer = torch.device("cuda", 1) if device.startswith("cuda") else torch.device("cpu")
        return (weights_route.kind(plan, DraftWeights, "trainer", trainer),
                weights_route.receivers_gpu(plan, DraftWeights, trainer))

    assert route("main", "cuda") == ("cuda_ipc", torch.device("cuda", 0))
    assert route("main", "cpu") == ("file", None)
    assert route("trainer", "cpu")[0] == "local"


def started(policy_dir, tmp_path, **params):
    """The distiller alone, in graph()'s plan (its DraftWeights go to a Generator in another
    process on the CPU: by file)."""
    from respec.actors.captured_distiller import CapturedDistiller

    actor = CapturedDistiller(CapturedDistiller.Params(model_path=str(policy_dir), weights_dir=str(tmp_path / "d"),
                                                       **params),
                              SimpleNamespace(instance="distiller/0", log=structlog.get_logger(),
                                              plan=plan_of(graph(str(policy_dir))),
                                              group=SimpleNamespace(name="trainer")))
    asyncio.run(actor.on_start())
    sent, reports = [], []

    async def send(message, **fields):
        sent.append(message)

    actor.send, actor.report = send, lambda step, **row: reports.append({"step": step, **row})
    return actor, sent, reports


def captured_pass(policy, version: int, prompts: int = 8) -> CapturedTargets:
    """What the trainer would send for the policy's greedy continuations of some prompts."""
    generator = torch.Generator().manual_seed(5)
    starts = [torch.randint(0, 40, (4,), generator=generator) for _ in range(prompts)]
    rows = SpeculativeEngine(policy, None, max_rows=prompts, max_len=64).generate(
        starts, Sampling(temperature=0.0, max_new_tokens=16))
    tokens, valid = pad_right([r.prompt.tolist() + r.tokens for r in rows], 0)
    layers = layers_to_capture(policy.config)
    with torch.no_grad():
        output = policy(tokens, capture_layers=layers)
    return CapturedTargets(policy_version=version, layers=list(layers), tokens=tokens, valid=valid,
                           response_starts=torch.full((prompts,), 4), features=torch.cat(output.captured, dim=-1),
                           logits=output.logits, rewards=np.ones(prompts, np.float32),
                           groups=[f"g{i // 4}" for i in range(prompts)], parts=TargetParts.state_of(policy))


def test_acceptance_on_the_unseen_pass_rises_as_the_head_learns(policy_dir, tmp_path):
    """Every version's pass adds its gradient; a pass of a version update_interval on
    measures the head before and after one step (on its rollouts, not yet trained on), and
    the head is published."""
    actor, sent, reports = started(policy_dir, tmp_path, update_interval=1, lr=1e-2, unroll=2,
                                   heldout_temperature=0.0, eval_shape="s2_t1_n2")
    captured = captured_pass(load_model(policy_dir), 0)
    for version in range(60):
        asyncio.run(actor.on_captured(msgspec.structs.replace(captured, policy_version=version), None))
    assert [m.version for m in sent] == list(range(1, 60)) and sent[0].handle.kind == "file"
    first, last = reports[0], reports[-1]
    assert first["heldout_accept_before"] < 1.3 and last["heldout_accept_after"] > first["heldout_accept_before"] + 0.8
    assert all(r["distill_messages"] == 1 and r["distill_heldout_s"] > 0 for r in reports)
    asyncio.run(actor.on_stop())


def test_the_heads_target_parts_follow_the_messages(policy_dir, tmp_path):
    actor, _, _ = started(policy_dir, tmp_path)
    assert all(p.is_meta for p in actor.policy.model.layers.parameters())  # no policy copy on the trainer's device
    policy = load_model(policy_dir)
    with torch.no_grad():
        policy.model.norm.weight.fill_(3.0)
    asyncio.run(actor.on_captured(captured_pass(policy, 0, prompts=2), None))
    assert torch.equal(actor.head.target.norm.weight, torch.full_like(policy.model.norm.weight, 3.0))
    asyncio.run(actor.on_stop())


def test_a_head_reading_other_layers_than_the_trainer_captures_is_refused(policy_dir, tmp_path):
    from respec.actors.captured_distiller import CapturedDistiller

    head_dir = EagleHead.for_target(load_model(policy_dir), capture_layers=(0,)).save(tmp_path / "head")
    actor = CapturedDistiller(CapturedDistiller.Params(model_path=str(policy_dir), draft_path=str(head_dir)),
                              SimpleNamespace(instance="distiller/0", log=structlog.get_logger()))
    with pytest.raises(ValueError, match=r"reads layers \[0\]; the trainer captures \[1, 1, 1\]"):
        asyncio.run(actor.on_start())


def test_max_rows_distils_from_and_measures_on_a_random_subset_of_each_message(policy_dir, tmp_path, monkeypatch):
    from respec.actors import captured_distiller

    seen, measured = [], []
    real, real_acceptance = captured_distiller.distill_loss, captured_distiller.captured_acceptance

    def recording(head, features, tokens, logits, weights, valid, steps):
        seen.append((tokens.shape[0], weights.tolist()))
        return real(head, features, tokens, logits, weights=weights, valid=valid, steps=steps)

    def acceptance(head, features, tokens, *rest):
        measured.append(tokens.shape[0])
        return real_acceptance(head, features, tokens, *rest)

    monkeypatch.setattr(captured_distiller, "distill_loss", recording)
    monkeypatch.setattr(captured_distiller, "captured_acceptance", acceptance)
    actor, _, _ = started(policy_dir, tmp_path, max_rows=3, reward_weighting="reward")
    captured = captured_pass(load_model(policy_dir), 0)
    rewards = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32)  # mean 0.5: w = r / 0.5, floored at 0.1
    for version in range(2):  # the second one's update learns from the first's rows
        asyncio.run(actor.on_captured(msgspec.structs.replace(captured, rewards=rewards, policy_version=version), None))
    assert seen[0][0] == 3 and all(w in (pytest.approx(0.1), pytest.approx(2.0)) for w in seen[0][1])
    assert measured == [3, 3]  # before and after the update, on the second message's kept rows
    asyncio.run(actor.on_stop())


def shorter(captured: CapturedTargets, cut: int, version: int) -> CapturedTargets:
    """The same rows with their last `cut` positions gone (a pass padded to another length)."""
    return msgspec.structs.replace(captured, policy_version=version, tokens=captured.tokens[:, :-cut],
                                   valid=captured.valid[:, :-cut], features=captured.features[:, :-cut],
                                   logits=captured.logits[:, :-cut], parts={})


def test_an_updates_messages_are_learnt_from_in_one_pass(policy_dir, tmp_path, monkeypatch):
    """update_interval 3: the rows of three messages of different lengths, learnt from in
    one head pass at the update (kept_mb 0: one pass a message), with the same gradient:
    the mean over all their rows."""
    from respec.actors import captured_distiller

    real_loss, real_update = captured_distiller.distill_loss, captured_distiller.CapturedDistiller._update
    captured = captured_pass(load_model(policy_dir), 0)

    def run(kept_mb: float) -> tuple[list, list]:
        passes, grads = [], []

        def recording(head, features, tokens, logits, weights, valid, steps):
            passes.append(tuple(tokens.shape))
            return real_loss(head, features, tokens, logits, weights=weights, valid=valid, steps=steps)

        def update(actor, heldout, version):  # the gradient the step takes: the kept rows learnt, then / rows
            actor._learn_kept()
            grads.extend(p.grad / actor.rows_learnt for p in actor.head.parameters() if p.grad is not None)
            return real_update(actor, heldout, version)

        monkeypatch.setattr(captured_distiller, "distill_loss", recording)
        monkeypatch.setattr(captured_distiller.CapturedDistiller, "_update", update)
        actor, sent, reports = started(policy_dir, tmp_path / str(kept_mb), update_interval=3, kept_mb=kept_mb,
                                       max_rows=4)
        for version, cut in enumerate((1, 3, 5, 1)):
            asyncio.run(actor.on_captured(shorter(captured, cut, version), None))
        assert [m.version for m in sent] == [1] and reports[0]["distill_messages"] == 3
        asyncio.run(actor.on_stop())
        return passes, grads

    length = captured.tokens.shape[1]
    (together, together_grads), (apart, apart_grads) = run(1024.0), run(0.0)
    assert together == [(12, length - 1)]  # the fourth message's rows wait for the next update
    assert apart == [(4, length - 1), (4, length - 3), (4, length - 5), (4, length - 1)]
    assert len(together_grads) == len(apart_grads) > 0
    for joined, alone in zip(together_grads, apart_grads, strict=True):
        torch.testing.assert_close(joined, alone, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("worker_thread", [True, False])
def test_the_heads_work_leaves_the_event_loop_free_for_the_trainer(policy_dir, tmp_path, worker_thread):
    """In its worker thread the head's passes let the loop the trainer shares run meanwhile
    (in the handler they held it: the trainer's next update waited); it still publishes."""
    import threading

    actor, sent, _ = started(policy_dir, tmp_path, update_interval=1, worker_thread=worker_thread)
    ticks, threads, during, real = [0], [], [], actor._learn

    def learn(captured):  # the loop's ticks while a message is learnt from
        threads.append(threading.current_thread().name)
        before = ticks[0]
        update = real(captured)
        during.append(ticks[0] - before)
        return update

    actor._learn = learn
    captured = captured_pass(load_model(policy_dir), 0)

    async def two_messages_beside_a_ticker() -> None:
        async def ticker():
            while True:
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        for version in range(2):
            await actor.on_captured(msgspec.structs.replace(captured, policy_version=version), None)
        task.cancel()

    asyncio.run(two_messages_beside_a_ticker())
    assert [m.version for m in sent] == [1]
    if worker_thread:
        assert threads == ["captured-distiller_0"] * 2 and min(during) > 10
    else:
        assert threads == ["MainThread"] * 2 and during == [0, 0]
    asyncio.run(actor.on_stop())
