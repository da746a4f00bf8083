"""FastRollouts: the fast path as an actor, in place of the Generator + Verifier pair.
Through a graph it generates what FastGenerator generates (greedy, with an EAGLE head
drafting and without), refuses what the fast path cannot do one prompt at a time, stamps
tokens with the policy that made them, and its plan refuses the actors it replaces or
leaves nothing to do for. The fast path runs eagerly on the CPU (no graphs, no kernels)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import structlog
import torch
import yaml

from respec.actors.fast_rollouts import FastRollouts
from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import EagleHead
from respec.engine.fast import FastGenerator
from respec.messages import DraftWeights, PolicyWeights, Prompt, SamplingParams, WeightsHandle
from respec.runtime.graph import ConfigError, load_config
from respec.runtime.plan import build_plan
from tests.checkpoints import small_qwen2
from tests.heads import saved_distilled_head

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = [[1, 2, 3, 1, 2, 3, 1], [5, 6, 5, 6], [7, 8, 9, 10, 11, 7, 8, 9], [3, 3, 3], [4, 9, 4, 9, 4]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_qwen2(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def eagle_head_dir(tmp_path_factory, checkpoint):
    return saved_distilled_head(checkpoint, tmp_path_factory.mktemp("eagle") / "head")


def rollouts_graph(tmp_path, rollouts_params: dict, prompts_file, expected: int) -> dict:
    out = tmp_path / "rollouts.json"
    return {
        "source": {"class": "tests.runtime.sd_actors.PromptsWithSampling", "params": {"prompts_file": str(prompts_file)}},
        "generator": {"class": "respec.actors.fast_rollouts.FastRollouts", "params": rollouts_params},
        "sink": {"class": "tests.runtime.sd_actors.RolloutFile", "params": {"out_file": str(out), "expected": expected}},
    }


def perturbed(checkpoint, seed: int):
    """The checkpoint's policy with noise on every weight: a "newer version" that generates
    other tokens."""
    torch.manual_seed(seed)
    policy = load_model(checkpoint)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return policy


def test_a_torn_policy_copy_generates_nothing_until_the_next_version_loads(checkpoint, monkeypatch):
    """A cuda_ipc copy the trainer wrote over mid-copy (TornWeights, raised after the copy)
    may mix two versions: prompts wait for the next version, and their tokens are its."""
    import contextlib

    from respec.actors import fast_rollouts
    from respec.runtime.weights_transfer import TornWeights

    actor, sent = started(FastRollouts.Params(model_path=str(checkpoint), max_rows=4, max_len=64, max_new_tokens=8,
                                              gather_s=0.0))
    new_policy = perturbed(checkpoint, seed=3)
    real = fast_rollouts.loaded_tensors

    @contextlib.contextmanager
    def torn_at_version_1(handle, version, device="cpu"):
        with real(handle, version, device=device) as tensors:
            yield tensors
        if version == 1:
            raise TornWeights("v1: written over during the copy")

    monkeypatch.setattr(fast_rollouts, "loaded_tensors", torn_at_version_1)

    def weights(version):
        tensors = {name: t.clone() for name, t in new_policy.state_dict().items()}
        return PolicyWeights(version=version, handle=WeightsHandle(kind="local", tensors=tensors))

    async def scenario():
        await actor.on_start()
        loop = asyncio.create_task(actor.run())
        await actor.on_policy_weights(weights(1), None)
        await actor.on_prompt(prompt(0, PROMPTS[0], 8), None)
        await asyncio.sleep(0.3)
        assert sent == []  # held: the copy of v1 may be mixed
        await actor.on_policy_weights(weights(2), None)
        await until(lambda: len(sent) == 1)
        loop.cancel()

    asyncio.run(scenario())
    expected = FastGenerator(new_policy, None, max_rows=4, max_len=64, max_new=8, max_k=0).generate([PROMPTS[0]])[0]
    assert sent[0].tokens.tolist() == expected.tokens and sent[0].token_versions.tolist() == [2] * 8


@pytest.mark.parametrize("draft_length, worker_thread", [(0, False), (3, False), (3, True)])
def test_fast_rollouts_generate_what_the_fast_path_generates(run_graph, tmp_path, checkpoint, eagle_head_dir,
                                                             draft_length, worker_thread):
    """Five prompts asking for 20, 20, 7, 20 and 1 tokens, in one batch of up to 4 rows and
    one of 1: each the fast path's own greedy rows, cut at its limit (batches on the loop or
    in the worker thread)."""
    limits = [20, 20, 7, 20, 1]
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([{"tokens": p, "sampling": {"max_new_tokens": m}}
                                        for p, m in zip(PROMPTS, limits, strict=True)]))
    params = {"model_path": str(checkpoint), "max_rows": 4, "max_len": 64, "max_new_tokens": 20,
              "draft_path": str(eagle_head_dir), "draft_length": draft_length, "worker_thread": worker_thread}
    result = run_graph(rollouts_graph(tmp_path, params, prompts_file, len(PROMPTS)),
                       name=f"fast_{draft_length}_{worker_thread}", threads_per_group=1)
    assert result.ok, result.reason
    rollouts = json.loads((tmp_path / "rollouts.json").read_text())
    model = load_model(checkpoint)
    fast = FastGenerator(model, EagleHead.load(eagle_head_dir, model), max_rows=8, max_len=64, max_new=20, max_k=3)
    expected = fast.generate(PROMPTS, draft_length)
    for index, (row, limit) in enumerate(zip(expected, limits, strict=True)):
        got = rollouts[f"p{index}"]
        assert got["tokens"] == row.tokens[:limit]
        assert got["logprobs"] == pytest.approx(row.logprobs[:limit], abs=1e-4)
        assert got["versions"] == [0] * limit and got["finish_reason"] == "length" and not got["error"]
    drafted = [r["accept_len"] for i, r in rollouts.items() if i != "p4"]  # p4's one token came from the prefill
    assert (min(drafted) > 1.0) == (draft_length > 0)


def test_prompts_the_fast_path_cannot_generate_come_back_as_errors(run_graph, tmp_path, checkpoint):
    """Refused one at a time, with the reason; the others are generated."""
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([
        {"tokens": [1, 2, 3]},                                   # greedy, no stop tokens: sets every row's sampling
        {"tokens": [1, 2, 3], "sampling": {"top_k": 5}},
        {"tokens": [1, 2, 3], "sampling": {"temperature": 1.0}},  # not the first prompt's temperature
        {"tokens": [1, 2, 3], "sampling": {"max_new_tokens": 30}},
        {"tokens": [1, 2, 3] * 17},                              # does not fit max_len with 16 new tokens
        {"tokens": [1, 999]},                                    # outside the vocabulary
        {"tokens": [4, 5]},
    ]))
    params = {"model_path": str(checkpoint), "max_rows": 8, "max_len": 64, "max_new_tokens": 16}
    result = run_graph(rollouts_graph(tmp_path, params, prompts_file, 7), name="fast_refusals", threads_per_group=1)
    assert result.ok, result.reason
    rollouts = json.loads((tmp_path / "rollouts.json").read_text())
    errors = {key: row["error"] for key, row in rollouts.items() if row["finish_reason"] == "error"}
    assert sorted(errors) == ["p1", "p2", "p3", "p4", "p5"]
    assert "top-k and top-p" in errors["p1"] and "every row samples alike" in errors["p2"]
    assert "params.max_new_tokens (16)" in errors["p3"] and "params.max_len is 64" in errors["p4"]
    assert "outside the model's vocabulary" in errors["p5"]
    assert len(rollouts["p0"]["tokens"]) == len(rollouts["p6"]["tokens"]) == 16


def started(params: FastRollouts.Params) -> tuple[FastRollouts, list]:
    """The actor started outside a graph, with what it sends collected."""
    actor = FastRollouts(params, SimpleNamespace(instance="generator/0", log=structlog.get_logger()))
    sent = []

    async def send(message, correlation_id=""):
        sent.append(message)

    actor.send = send
    return actor, sent


def prompt(index: int, tokens: list[int], max_new: int, min_version: int = 0) -> Prompt:
    return Prompt(prompt_id=f"p{index}", group_id="g", sample_index=index, tokens=np.array(tokens, dtype=np.int32),
                  sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new), min_policy_version=min_version)


async def until(condition, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


def hook_batches(actor: FastRollouts, at_start) -> None:
    """Call at_start(index) where each batch starts generating (in the worker thread, if on);
    the FastGenerator is built at the first batch, since it needs the prompts' sampling."""
    real, count = actor._generator, []

    def hooked() -> FastGenerator:
        fast = real()
        generate = fast.generate

        def wrapped(*args, **kwargs):
            at_start(len(count))
            count.append(1)
            return generate(*args, **kwargs)

        fast.generate = wrapped
        actor._generator = lambda: fast
        return fast

    actor._generator = hooked


@pytest.mark.parametrize("worker_thread", [False, True])
def test_a_prompt_waits_for_its_policy_and_its_tokens_carry_that_version(checkpoint, worker_thread):
    """A prompt that needs policy version 1 is held until PolicyWeights(1) load; its tokens
    are then the new policy's, stamped 1, while an earlier prompt's carry 0 (batches on the
    loop or in a worker thread alike)."""
    actor, sent = started(FastRollouts.Params(model_path=str(checkpoint), max_rows=4, max_len=64, max_new_tokens=8,
                                              gather_s=0.0, worker_thread=worker_thread))
    new_policy = perturbed(checkpoint, seed=7)

    async def scenario():
        await actor.on_start()
        loop = asyncio.create_task(actor.run())
        for index, min_version in enumerate((0, 1)):
            await actor.on_prompt(prompt(index, PROMPTS[0], 8, min_version), None)
        await until(lambda: len(sent) == 1)
        await asyncio.sleep(0.3)
        assert [m.prompt.prompt_id for m in sent] == ["p0"]  # p1 held: version 1 has not loaded
        tensors = {name: t.clone() for name, t in new_policy.state_dict().items()}
        await actor.on_policy_weights(PolicyWeights(version=1, handle=WeightsHandle(kind="local", tensors=tensors)),
                                      None)
        await until(lambda: len(sent) == 2)
        loop.cancel()

    asyncio.run(scenario())
    first, second = sent
    assert first.token_versions.tolist() == [0] * 8 and second.token_versions.tolist() == [1] * 8
    expected = FastGenerator(new_policy, None, max_rows=4, max_len=64, max_new=8, max_k=0).generate([PROMPTS[0]])[0]
    old = FastGenerator(load_model(checkpoint), None, max_rows=4, max_len=64, max_new=8, max_k=0).generate([PROMPTS[0]])[0]
    assert second.tokens.tolist() == expected.tokens != old.tokens == first.tokens.tolist()


def test_in_the_worker_thread_the_loop_runs_during_a_batch_and_weights_wait_for_its_end(checkpoint):
    """worker_thread: while a batch generates, the loop the actor shares runs (other actors'
    messages are handled), and PolicyWeights arriving then load only after the batch: its
    tokens are the old policy's, stamped 0; the next batch's are the new one's, stamped 1."""
    import threading

    actor, sent = started(FastRollouts.Params(model_path=str(checkpoint), max_rows=4, max_len=64, max_new_tokens=8,
                                              gather_s=0.0, worker_thread=True))
    new_policy = perturbed(checkpoint, seed=7)
    in_batch, release, threads = threading.Event(), threading.Event(), []

    async def scenario():
        await actor.on_start()

        def held(index: int) -> None:  # each batch waits in its thread until the test lets it go
            threads.append(threading.current_thread().name)
            in_batch.set()
            assert release.wait(10)

        hook_batches(actor, held)
        loop = asyncio.create_task(actor.run())
        await actor.on_prompt(prompt(0, PROMPTS[0], 8), None)
        await until(in_batch.is_set)
        ticks = 0
        tensors = {name: t.clone() for name, t in new_policy.state_dict().items()}
        load = asyncio.create_task(actor.on_policy_weights(
            PolicyWeights(version=1, handle=WeightsHandle(kind="local", tensors=tensors)), None))
        for _ in range(20):  # the loop turns while the batch is held in its thread
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 20 and not load.done() and actor.version == 0 and not sent
        release.set()
        await load
        await until(lambda: len(sent) == 1)
        await actor.on_prompt(prompt(1, PROMPTS[0], 8, min_version=1), None)
        await until(lambda: len(sent) == 2)
        loop.cancel()
        await actor.on_stop()

    asyncio.run(scenario())
    first, second = sent
    assert threads == ["fast-rollouts_0"] * 2
    assert first.token_versions.tolist() == [0] * 8 and second.token_versions.tolist() == [1] * 8
    expected = FastGenerator(new_policy, None, max_rows=4, max_len=64, max_new=8, max_k=0).generate([PROMPTS[0]])[0]
    assert second.tokens.tolist() == expected.tokens != first.tokens.tolist()


@pytest.mark.parametrize("worker_thread", [False, True])
def test_in_the_worker_thread_a_batchs_rollouts_go_out_while_the_next_one_generates(checkpoint, worker_thread):
    """With prompts for two batches waiting, the thread starts the second batch before the
    first's rollouts are sent (the loop sends them, and the actors beside it score them, while
    it generates); on the loop they go out first. The last batch's go out once nothing waits."""
    import threading

    actor, sent = started(FastRollouts.Params(model_path=str(checkpoint), max_rows=1, max_len=64, max_new_tokens=8,
                                              gather_s=0.0, worker_thread=worker_thread))
    order, release = [], threading.Event()

    def at_start(index: int) -> None:
        order.append(f"batch {index}")
        if worker_thread and index == 1:
            assert release.wait(10)  # the second batch is held until the test has looked

    async def scenario():
        await actor.on_start()
        hook_batches(actor, at_start)
        real_send = actor.send

        async def send(message, correlation_id=""):
            if worker_thread and message.prompt.prompt_id == "p0":  # the loop is free: is batch 1 under way?
                await until(lambda: "batch 1" in order, seconds=2.0)  # (sent first, it never would be)
            order.append(f"sent {message.prompt.prompt_id}")
            await real_send(message, correlation_id)

        actor.send = send
        for index in range(2):
            await actor.on_prompt(prompt(index, PROMPTS[index], 8), None)
        loop = asyncio.create_task(actor.run())
        if worker_thread:
            await until(lambda: "sent p0" in order)
            assert order == ["batch 0", "batch 1", "sent p0"]  # p0 went out during batch 1
            release.set()
        await until(lambda: len(sent) == 2)
        loop.cancel()
        await actor.on_stop()

    asyncio.run(scenario())
    if worker_thread:
        assert order == ["batch 0", "batch 1", "sent p0", "sent p1"]
    else:
        assert order == ["batch 0", "sent p0", "batch 1", "sent p1"]
    assert [m.prompt.prompt_id for m in sent] == ["p0", "p1"]
    assert all(m.token_versions.tolist() == [0] * len(m.tokens) for m in sent)


def test_a_send_failing_during_a_threaded_batch_keeps_the_weights_locked_until_the_batch_ends(checkpoint):
    """The previous batch's rollouts go out while the next batch runs in the thread; if a
    send fails, the error waits for that batch, so no weights load under it."""
    import threading

    actor, _ = started(FastRollouts.Params(model_path=str(checkpoint), max_rows=1, max_len=64, max_new_tokens=8,
                                           gather_s=0.0, worker_thread=True))
    started_batches, release = [], threading.Event()

    def at_start(index: int) -> None:
        started_batches.append(index)
        if index == 1:
            assert release.wait(10)

    async def scenario():
        await actor.on_start()
        hook_batches(actor, at_start)

        async def failing_send(message, correlation_id=""):
            raise ConnectionError("the socket is gone")

        actor.send = failing_send
        for index in range(2):
            await actor.on_prompt(prompt(index, PROMPTS[index], 8), None)
        loop = asyncio.create_task(actor.run())
        await until(lambda: len(started_batches) == 2)
        await asyncio.sleep(0.2)
        assert not loop.done() and actor.between_batches.locked()  # the send failed; batch 1 still holds
        release.set()
        with pytest.raises(ConnectionError):
            await loop
        assert not actor.between_batches.locked()
        await actor.on_stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("staleness", [0, 1])
def test_an_rl_run_with_batches_in_the_thread_ends_within_its_staleness_bound(tmp_path, policy_dir, staleness):
    """Rollouts held back for the next batch must not hold up the run: synchronously
    (max_staleness 0) the next step's prompts wait for the policy these rollouts train, so
    they go out before the actor waits. Every step trains, none on rollouts too stale."""
    from respec.runtime.launcher import run_file
    from tests.runtime.test_rl_run import rl_config, step_rows

    file = rl_config(tmp_path, policy_dir, f"thread{staleness}", steps=3, staleness=staleness)
    config = yaml.safe_load(file.read_text())
    del config["actors"]["verifier"]
    config["actors"]["generator"] = {"class": "respec.actors.fast_rollouts.FastRollouts", "params": {
        "model_path": str(policy_dir), "max_rows": 8, "max_len": 64, "max_new_tokens": 12, "worker_thread": True}}
    file.write_text(yaml.safe_dump(config))
    result = run_file(file, progress=False)
    assert result.ok, result.reason
    steps = step_rows(result.run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["staleness_max"] <= staleness for r in steps)


def test_adaptive_drafting_times_each_bucket_learns_the_acceptance_and_keeps_the_tokens(checkpoint, eagle_head_dir):
    """With `adaptive`, the first batch times every (bucket, draft length) on this device,
    the choice per bucket comes from those costs and the acceptance rate, the rate moves to
    what the rollouts show (from a prior of 0.9, with a head accepted about half the time), and
    greedy tokens stay the plain rows' (drafting never changes them). A new head keeps the
    live rate, unless that rate had drafting off at every bucket: then the prior."""
    actor, sent = started(FastRollouts.Params(model_path=str(checkpoint), draft_path=str(eagle_head_dir), max_rows=8,
                                              max_len=64, max_new_tokens=20, adaptive=[2, 4], adaptive_rate=0.9,
                                              profile_steps=2, gather_s=0.0))

    async def scenario():
        await actor.on_start()
        loop = asyncio.create_task(actor.run())
        for index, tokens in enumerate(PROMPTS):
            await actor.on_prompt(prompt(index, tokens, 20), None)
        await until(lambda: len(sent) == len(PROMPTS))
        loop.cancel()

    asyncio.run(scenario())
    live = actor.live
    assert set(live.step_cost) == {(b, k) for b in (1, 2, 4, 8) for k in (0, 2, 4)}
    assert all(seconds > 0 for seconds in live.step_cost.values())
    assert set(live.choice) == {1, 2, 4, 8} and set(live.choice.values()) <= {0, 2, 4}
    assert any(k and rows for k, rows in actor.fast.chains.items())  # it drafted (a prior of 0.9 says it pays)
    assert live.rate < 0.8  # halfway (memory 0.5) from the prior to the ~0.47 this head shows here
    plain = FastGenerator(load_model(checkpoint), None, max_rows=8, max_len=64, max_new=20, max_k=0).generate(PROMPTS)
    assert {m.prompt.prompt_id: m.tokens.tolist() for m in sent} == {f"p{i}": r.tokens for i, r in enumerate(plain)}
    head = EagleHead.load(eagle_head_dir, load_model(checkpoint))

    def new_head(version: int) -> None:
        asyncio.run(actor.on_draft_weights(DraftWeights(version=version, handle=WeightsHandle(
            kind="local", tensors={name: t.clone() for name, t in head.state_dict().items()})), None))

    # From here the head-load rule, on costs fixed apart from the CPU's noise (two timed steps
    # a pair under a loaded CI machine could make drafting look free): k drafts cost 1 + k/10.
    live.step_cost.update({(b, k): 1.0 + k / 10 for b, k in live.step_cost})
    live.expect(0.05)
    assert not any(live.choice.values())
    new_head(1)
    assert live.rate == 0.9  # drafting was off everywhere: the prior, or nothing is ever observed
    live.expect(0.6)
    assert any(live.choice.values())
    new_head(2)
    assert live.rate == 0.6  # drafting on somewhere: the live rate stands


def test_a_full_batch_starts_without_waiting_out_gather_s(checkpoint):
    """max_rows prompts waiting end the gather at once; fewer wait up to gather_s for the
    rest of their step, and those that come within it join the same batch."""
    actor, sent = started(FastRollouts.Params(model_path=str(checkpoint), max_rows=2, max_len=64, max_new_tokens=4,
                                              gather_s=30.0))
    batches = []
    original = actor._generate

    async def generate(batch, unsent):
        batches.append([p.prompt_id for p in batch])
        return await original(batch, unsent)

    actor._generate = generate

    async def scenario():
        await actor.on_start()
        loop = asyncio.create_task(actor.run())
        await actor.on_prompt(prompt(0, PROMPTS[0], 4), None)
        await asyncio.sleep(0.2)
        assert not batches  # one of two: it waits for the rest of the step
        await actor.on_prompt(prompt(1, PROMPTS[1], 4), None)
        await until(lambda: len(sent) == 2, seconds=20.0)  # full: no 30 s wait
        loop.cancel()

    began = time.perf_counter()
    asyncio.run(scenario())
    assert batches == [["p0", "p1"]] and time.perf_counter() - began < 20.0


def test_adaptive_costs_measured_once_are_read_back_by_the_next_run(checkpoint, eagle_head_dir, tmp_path,
                                                                    monkeypatch):
    """Where the costs are kept (a GPU; here the CPU with the cache pointed at a folder), a
    second actor with the same key reads them instead of timing every (bucket, length); it
    still captures every pair's graph before its first batch (not mid-run, when the choice
    first picks one)."""
    from respec.actors import fast_rollouts

    monkeypatch.setattr(fast_rollouts.StepCostCache, "for_device", classmethod(lambda cls, device: cls(tmp_path)))
    monkeypatch.setattr(fast_rollouts, "step_cost_key", lambda device, model, head, **settings: {
        "model": str(model), "head": str(head), **settings})
    params = FastRollouts.Params(model_path=str(checkpoint), draft_path=str(eagle_head_dir), max_rows=2, max_len=64,
                                 max_new_tokens=4, adaptive=[2], profile_steps=1, gather_s=0.0)
    timed = []

    def run_once():
        actor, sent = started(params)

        async def scenario():
            await actor.on_start()
            loop = asyncio.create_task(actor.run())
            await actor.on_prompt(prompt(0, PROMPTS[0], 4), None)
            await until(lambda: len(sent) == 1)
            loop.cancel()

        monkeypatch.setattr(FastGenerator, "time_step", lambda self, b, k, steps: timed.append((b, k)) or 1e-3 * (k + 1))
        captures.clear()
        asyncio.run(scenario())
        return actor.live.step_cost

    captures = []
    capture = FastGenerator.capture
    monkeypatch.setattr(FastGenerator, "capture", lambda self, pairs, prefill=None: captures.append(
        sorted(pairs)) or capture(self, pairs, prefill))
    first = run_once()
    assert sorted(timed) == [(1, 0), (1, 2), (2, 0), (2, 2)]
    assert run_once() == first and len(timed) == 4  # read back: nothing timed the second time
    assert captures[0] == [(1, 0), (1, 2), (2, 0), (2, 2)]  # every pair, before the batch's own capture
    assert len(list(tmp_path.glob("step-costs-*.json"))) == 1


def plan(tmp_path, actors: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "f"}, "actors": actors}))
    return build_plan(load_config(path), str(path))


ROLLOUTS = {"class": "respec.actors.fast_rollouts.FastRollouts", "params": {"model_path": "models/tiny/policy"}}
PROMPTS_ACTOR = {"class": "tests.runtime.sd_actors.FixedPrompts", "params": {"prompts_file": "x"}}
SINK = {"class": "tests.runtime.sd_actors.RolloutFile", "params": {"out_file": "x", "expected": 1}}


def test_the_generator_verifier_pair_is_refused_beside_it(tmp_path):
    actors = {"prompts": PROMPTS_ACTOR, "generator": ROLLOUTS, "sink": SINK,
              "native": {"class": "respec.actors.generator.Generator"},
              "verifier": {"class": "respec.actors.verifier.Verifier", "params": {"model_path": "x"}}}
    with pytest.raises(ConfigError, match=r"actors.generator: actors.native \(Generator\) generates rollouts too; "
                                          "FastRollouts replaces the Generator \\+ Verifier pair"):
        plan(tmp_path, actors)


def test_a_scheduler_is_refused_beside_it():
    """(In a whole graph the plan already fails on the Scheduler's missing GenerationStats.)"""
    from respec.actors.scheduler import Scheduler

    actors = {"generator": SimpleNamespace(cls=FastRollouts, sends=FastRollouts.sends, handles={Prompt: "on_prompt"}),
              "scheduler": SimpleNamespace(cls=Scheduler, sends=Scheduler.sends, handles=Scheduler.handled_types())}
    problems = FastRollouts.check_plan("generator", FastRollouts.Params(model_path="x"), SimpleNamespace(actors=actors))
    assert problems == ["actors.scheduler (Scheduler) decides the draft shape step by step; FastRollouts takes a "
                        "draft length per batch bucket (params.draft_lengths): remove it"]


@pytest.mark.parametrize("params, says", [
    ({"draft_length": 2}, "set params.draft_path"),
    ({"adaptive": [2, 4]}, "drafted with an EAGLE head (params.draft_path)"),
    ({"draft_path": "h", "adaptive": [2], "draft_length": 3}, "leave params.draft_length(s) unset"),
    ({"draft_path": "h", "draft_lengths": {3: 2}}, "params.draft_lengths names [3], which are not batch buckets"),
    ({"max_rows": 0}, "params.max_rows must be >= 1"),
])
def test_bad_parameters_are_named_before_the_run(tmp_path, params, says):
    rollouts = {**ROLLOUTS, "params": {**ROLLOUTS["params"], **params}}
    with pytest.raises(ConfigError, match=re.escape(says)):
        plan(tmp_path, {"prompts": PROMPTS_ACTOR, "generator": rollouts, "sink": SINK})
