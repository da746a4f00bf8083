"""FastRollouts: the fast path (respec/engine/fast, docs/ENGINE.md "The fast path") as an
actor. Turns Prompts into Rollouts in place of the Generator + Verifier pair.

The Generator + Verifier pair runs the reference engine: draft trees, continuous batching,
a random stream per row, and a message round trip per step. On a GPU that is bound by the
host. This actor runs FastGenerator instead. It takes batches of up to `max_rows` prompts
and runs each to completion; every step is one CUDA graph on a GPU, with drafting,
verification and acceptance on the device. The prompts of an RL step arrive together:
those that come within `gather_s` of the first waiting one make one batch (which starts at
once when `max_rows` prompts wait).

Draft lengths are set per batch bucket in one of two ways:
- fixed, by `draft_length` and `draft_lengths`;
- or, with `adaptive`, chosen per bucket among the lengths it lists and plain decoding.
  The choice comes from this device's own step costs, timed at the first batch, and the
  acceptance of the run's rollouts, updated after every batch (`respec.sched.draft_lengths`,
  ReSpec's adaptive SD on the fast path).

What it gives up, and refuses with a clear reason (in check_plan, or per prompt as an
"error" Rollout, as the Verifier refuses bad input):
- **Per-step decisions.** No Scheduler decides the draft length step by step. EAGLE chains
  only, no trees.
- **Sampling.** One temperature and one set of stop tokens for every row: the first
  admitted prompt's. No top-k / top-p.
- **Random streams.** Rows sample from the process's generator (seeded by `seed`), so a
  sampled rollout depends on the batch it ran in and the draft lengths it ran with (with
  `adaptive`, chosen from measured times: runs do not repeat exactly). The Verifier keys
  each row's stream by its prompt id.

PolicyWeights and DraftWeights load between batches. Every token of a batch is stamped
with the policy version the batch ran with. The DraftDistiller works as with the
Generator: its samples carry tokens, and it computes the target's features itself. A
prompt whose min_policy_version is newer than the loaded policy waits, in order, until
that version loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import numpy as np
import torch

from respec.actors.generator import loaded_tensors
from respec.engine.admission import check_prompt_tokens
from respec.engine.checkpoint import load_model
from respec.engine.copy_in import copy_in
from respec.engine.devices import use_device
from respec.engine.drafters.eagle import EagleHead
from respec.engine.errors import INPUT_ERRORS
from respec.engine.fast import FastGenerator
from respec.engine.fast.runner import buckets_up_to
from respec.engine.fast.step_costs import StepCostCache, step_cost_key
from respec.engine.sampling import validate
from respec.messages import (
    DraftWeights,
    Envelope,
    PolicyWeights,
    Prompt,
    Rollout,
    SchedulerDecision,
    VerifyRequest,
)
from respec.runtime import Actor, handles
from respec.runtime.device_thread import DeviceThread
from respec.runtime.weights_transfer import SupersededWeights, TornWeights
from respec.sched.draft_lengths import LiveChoice

Unsent = Callable[[], Awaitable[None]]  # a batch's rollouts, ready to send


async def _sent(unsent: Unsent | None) -> None:
    """Send what is unsent (if anything); None, for `unsent = await _sent(unsent)`."""
    if unsent is not None:
        await unsent()


class FastRollouts(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str  # local Hugging Face checkpoint directory
        draft_path: str = ""  # an EAGLE head saved by `respec prepare` or EagleHead.save ("": no drafting)
        draft_length: int = 0  # drafted tokens per step at every batch bucket (needs draft_path)
        draft_lengths: dict[int, int] = {}  # bucket size (1, 2, 4, ..., max_rows) -> its draft length
        # Draft lengths to choose among per bucket, with plain decoding, from this device's own
        # step costs (measured at the first batch) and the acceptance of the run's rollouts:
        # ReSpec's adaptive SD (respec.sched.draft_lengths). [] keeps draft_length(s).
        adaptive: list[int] = []
        adaptive_rate: float = 0.7  # per-draft acceptance assumed until the first rollouts say otherwise
        profile_steps: int = 20  # steps timed per (bucket, draft length) for the adaptive choice
        max_rows: int = 64  # prompts generated together
        max_len: int = 512  # prompt + response tokens per row
        max_new_tokens: int = 128  # the most new tokens a prompt may ask for
        device: str = "auto"  # "auto": cuda where there is one, else cpu (bf16 on cuda, float32 on cpu)
        gather_s: float = 0.02  # wait up to this long after the first waiting prompt for the rest of its step
        seed: int = 0
        # Each batch in a thread of its own, so that the event loop this actor shares (with the
        # PromptSource and RewardScorer in the usual graphs) runs during it: the next step's
        # prompts are posed and this step's rollouts scored while the GPU generates, not after.
        # On two H100s 0.030 s passed between batches, 0.011 s of it loading the weights
        # (504160d). Weights still load only between batches. Off: the batch holds the loop.
        worker_thread: bool = False

    sends = (Rollout,)

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        problems = _param_problems(params)
        for other, actor in plan.actors.items():
            if other == name:
                continue
            if SchedulerDecision in actor.sends:
                problems.append(f"actors.{other} ({actor.cls.__name__}) decides the draft shape step by step; "
                                "FastRollouts takes a draft length per batch bucket (params.draft_lengths): remove it")
            elif Prompt in actor.handles or VerifyRequest in actor.handles or VerifyRequest in actor.sends:
                problems.append(f"actors.{other} ({actor.cls.__name__}) generates rollouts too; FastRollouts "
                                "replaces the Generator + Verifier pair: remove both")
        return problems

    async def on_start(self) -> None:
        p = self.params
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = use_device(auto if p.device == "auto" else p.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(p.seed)
        self.model = load_model(Path(p.model_path), dtype=dtype, device=self.device)
        self.head = (EagleHead.load(p.draft_path, self.model).to(device=self.device, dtype=dtype).eval()
                     if p.draft_path else None)
        self.lengths = {b: p.draft_lengths.get(b, p.draft_length) for b in buckets_up_to(p.max_rows)}
        self.live: LiveChoice | None = None  # with params.adaptive: the choice per bucket, learnt as it goes
        self.fast: FastGenerator | None = None  # built for the first admitted prompt's sampling
        self.sampling: tuple[float, tuple[int, ...]] | None = None  # (temperature, stop ids) of every row
        self.version = 0
        self.torn = False  # the policy holds a copy that may mix two versions: generate nothing until the next
        self.waiting: deque[Prompt] = deque()
        self.wake = asyncio.Event()
        self.between_batches = asyncio.Lock()  # held from taking a batch to its end: weights load outside it
        self.worker = DeviceThread("fast-rollouts", self.device, enabled=p.worker_thread)
        self.log.info("fast_rollouts_ready", device=str(self.device), drafting=self.head is not None,
                      draft_lengths=self.lengths)

    @handles(Prompt)
    async def on_prompt(self, prompt: Prompt, envelope: Envelope) -> None:
        self.waiting.append(prompt)
        self.wake.set()

    async def on_stop(self) -> None:
        if hasattr(self, "worker"):
            self.worker.close()

    @handles(PolicyWeights, optional=True)
    async def on_policy_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        async with self.between_batches:
            self._load_policy(weights, envelope)

    def _load_policy(self, weights: PolicyWeights, envelope: Envelope | None) -> None:
        """Into the policy in place (the head shares its embeddings, norm and output layer),
        then into the fast path's fused copies."""
        started = time.time()  # the envelope's sent_at is wall-clock time: how long the announcement waited
        try:
            with loaded_tensors(weights.handle, weights.version, device=str(self.device)) as tensors, torch.no_grad():
                copy_in(self.model, tensors)  # one launch, not one per tensor: ~5 ms less a load (H100)
        except SupersededWeights as error:  # nothing copied; a newer announcement follows
            self.log.info("policy_weights_superseded", version=weights.version, reason=str(error))
            return
        except TornWeights as error:  # copied, maybe mixed; the newer version follows and overwrites it all
            self.torn = True
            self.log.warning("policy_weights_torn", version=weights.version, reason=str(error))
            return
        self.torn = False
        self._refresh()
        self.version = weights.version
        waited = None if envelope is None else round(started - envelope.sent_at, 4)  # None: called directly
        self.log.info("policy_weights_loaded", version=weights.version, waited_s=waited,
                      load_s=round(time.time() - started, 4))
        self.wake.set()  # held prompts may be ready now

    @handles(DraftWeights, optional=True)
    async def on_draft_weights(self, weights: DraftWeights, envelope: Envelope) -> None:
        async with self.between_batches:
            self._load_head(weights)

    def _load_head(self, weights: DraftWeights) -> None:
        if self.head is None:
            return
        started = time.perf_counter()  # between two batches: on the rollouts' critical path
        try:
            with loaded_tensors(weights.handle, weights.version, device=str(self.device)) as tensors, torch.no_grad():
                self.head.load_state_dict(tensors)
        except (ValueError, OSError, RuntimeError) as error:  # a bad update must not stop generation
            self.log.warning("draft_weights_not_loaded", version=weights.version,
                             error=f"{type(error).__name__}: {error}")
            return
        self._refresh()
        if self.live is not None:
            self.live.new_head(self.params.adaptive_rate)
        self.log.info("draft_weights_loaded", version=weights.version, kind=weights.handle.kind,
                      load_s=round(time.perf_counter() - started, 4))

    def _refresh(self) -> None:
        if self.fast is not None:
            self.fast.refresh_weights()

    async def run(self) -> None:
        unsent = None  # the last batch's rollouts; with worker_thread they go out during the next batch
        while True:
            if len(self.waiting) < self.params.max_rows:  # about to wait: what prompts wait on goes out first
                unsent = await _sent(unsent)
            if not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._gather()
            async with self.between_batches:  # the policy taken with is the one the batch runs
                batch = await self._take()
                if batch:
                    unsent = await self._generate(batch, unsent)
            if not batch or not self.worker.threaded:
                unsent = await _sent(unsent)
            if not batch:  # every waiting prompt needs a newer policy (or was refused)
                self.wake.clear()
                await self.wake.wait()
                continue
            await asyncio.sleep(0)  # weights and prompts are handled between batches

    async def _gather(self) -> None:
        """Wait for the rest of the first waiting prompt's step: gather_s at most, and no
        longer once a full batch (max_rows) waits. A step's prompts arrive back to back, so
        a fixed wait would idle the GPU for most of gather_s every RL step."""
        deadline = time.perf_counter() + self.params.gather_s
        while len(self.waiting) < self.params.max_rows and (left := deadline - time.perf_counter()) > 0:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), left)

    async def _take(self) -> list[Prompt]:
        """Up to max_rows prompts the loaded policy may generate, in order; bad ones are
        refused, those that need a newer policy stay queued in order."""
        batch, held = [], deque()
        while self.waiting and len(batch) < self.params.max_rows:
            prompt = self.waiting.popleft()
            try:
                self._check(prompt)
            except INPUT_ERRORS as error:
                await self._refuse(prompt, f"{type(error).__name__}: {error}")
                continue
            (held if self.torn or prompt.min_policy_version > self.version else batch).append(prompt)
        self.waiting.extendleft(reversed(held))
        return batch

    def _check(self, prompt: Prompt) -> None:
        """The native backend's checks, then what the fast path cannot do."""
        sampling, p = prompt.sampling, self.params
        check_prompt_tokens(prompt.tokens, sampling.max_new_tokens, self.model.config.vocab_size)
        validate(sampling.temperature, sampling.top_k, sampling.top_p)
        if sampling.top_k or sampling.top_p < 1.0:
            raise ValueError("top-k and top-p sampling are not on the fast path; use the Generator + Verifier")
        if sampling.max_new_tokens > p.max_new_tokens:
            raise ValueError(f"max_new_tokens {sampling.max_new_tokens} is more than params.max_new_tokens "
                             f"({p.max_new_tokens})")
        need = len(prompt.tokens) + p.max_new_tokens + self._max_k() + 1
        if need > p.max_len:
            raise ValueError(f"a prompt of {len(prompt.tokens)} tokens needs {need} positions with max_new_tokens "
                             f"{p.max_new_tokens} and drafting; params.max_len is {p.max_len}")
        asked = (float(sampling.temperature), tuple(sorted(set(sampling.stop_token_ids))))
        if self.sampling is not None and asked != self.sampling:
            raise ValueError(f"every row samples alike on the fast path: temperature {self.sampling[0]}, stop tokens "
                             f"{list(self.sampling[1])} (the first prompt's); this one asks {asked[0]}, {list(asked[1])}")
        self.sampling = asked

    async def _refuse(self, prompt: Prompt, reason: str) -> None:
        self.log.warning("prompt_rejected", prompt_id=prompt.prompt_id, error=reason)
        await self.send(Rollout.refused(prompt, reason), correlation_id=prompt.prompt_id)

    async def _generate(self, batch: list[Prompt], unsent: Unsent | None) -> Unsent:
        """One batch to completion, within `between_batches` (so no weights change mid-batch):
        on the loop, or in the worker thread while the loop handles other actors' messages.
        In the thread, the previous batch's rollouts (`unsent`) go out, and are scored by the
        actors sharing the loop, while this batch generates; sent first, they and their
        scoring were part of the gap between batches (0.033 s on two H100s, 450490b).
        Returns this batch's rollouts, to send."""
        fast = self._generator()
        lengths = self.live.choice if self.live is not None else self.lengths
        started = time.perf_counter()
        generating = self.worker.start(functools.partial(
            fast.generate, [prompt.tokens.tolist() for prompt in batch], lengths,
            max_new=[prompt.sampling.max_new_tokens for prompt in batch]))
        try:
            await _sent(unsent)
        finally:  # a failed send must not free the lock (and let weights load) mid-batch
            results = await generating
        seconds = time.perf_counter() - started
        if self.live is not None:
            self.live.observe(fast.chains, sum(result.accepted for result in results))
        self.log.info("batch_generated", rows=len(batch), tokens=sum(len(r.tokens) for r in results),
                      longest=max(len(r.tokens) for r in results), steps=fast.steps_taken,
                      seconds=round(seconds, 4), policy_version=self.version, draft_lengths=lengths)
        return functools.partial(self._send_rollouts, batch, results, self.version, seconds)

    async def _send_rollouts(self, batch: list[Prompt], results: list, version: int, seconds: float) -> None:
        stops = set(self.sampling[1])
        for prompt, result in zip(batch, results, strict=True):
            tokens = np.array(result.tokens, dtype=np.int32)
            await self.send(Rollout(
                prompt=prompt, tokens=tokens, logprobs=np.array(result.logprobs, dtype=np.float32),
                token_versions=np.full(len(tokens), version, dtype=np.int32),
                finish_reason="stop" if len(tokens) and int(tokens[-1]) in stops else "length",
                accept_len=(len(tokens) - 1) / max(result.steps, 1), gen_time_s=seconds,
            ), correlation_id=prompt.prompt_id)

    def _generator(self) -> FastGenerator:
        """Built once, for the sampling every row shares (graphs are captured on first use)."""
        if self.fast is None:
            temperature, stops = self.sampling
            p = self.params
            self.fast = FastGenerator(self.model, self.head, max_rows=p.max_rows, max_len=p.max_len,
                                      max_new=p.max_new_tokens, max_k=self._max_k(),
                                      temperature=temperature, eos_ids=stops)
            if p.adaptive:
                started = time.perf_counter()
                costs, cached = self._step_costs()
                self.live = LiveChoice(costs, p.adaptive_rate)
                self.log.info("draft_lengths_profiled", choice=self.live.choice, cached=cached,
                              seconds=round(time.perf_counter() - started, 3),
                              step_ms={f"{b}/{k}": round(1e3 * t, 3) for (b, k), t in self.live.step_cost.items()})
            self._capture_every_step()
        return self.fast

    def _capture_every_step(self) -> None:
        """Capture the graph of every (bucket, draft length) this actor may run, before the
        first batch. Profiling captures them as it times them, but step costs read back
        from disk skip that, and then a pair's graph was captured mid-run, the first time
        the adaptive choice picked it: likely the one ~2.2 s step in two runs with the
        distiller, whose head updates move the choice (8769895, docs/PERFORMANCE.md)."""
        if self.params.adaptive:
            pairs = [(b, k) for b in self.fast.buckets for k in self._adaptive_lengths()]
        else:
            pairs = [(b, self.lengths[b]) for b in self.fast.buckets]
        started = time.perf_counter()
        self.fast.capture(pairs)
        self.log.info("graphs_captured", pairs=len(pairs), seconds=round(time.perf_counter() - started, 3))

    def _step_costs(self) -> tuple[dict[tuple[int, int], float], bool]:
        """Seconds per step of every (bucket, draft length) on this device: what the
        adaptive choice weighs the expected accepted drafts against. Measured, or on a GPU
        read back from an earlier run with the same key (step_costs.py); and whether read."""
        p = self.params
        lengths = self._adaptive_lengths()
        cache = StepCostCache.for_device(self.device)
        key = None
        if cache.folder is not None:
            key = step_cost_key(self.device, p.model_path, p.draft_path, max_rows=p.max_rows, max_len=p.max_len,
                                max_new=p.max_new_tokens, temperature=self.sampling[0], lengths=list(lengths),
                                buckets=list(self.fast.buckets), profile_steps=p.profile_steps)
            if (costs := cache.load(key)) is not None:
                return costs, True
        costs = {(b, k): self.fast.time_step(b, k, p.profile_steps) for b in self.fast.buckets for k in lengths}
        if key is not None:
            cache.store(key, costs)
        return costs, False

    def _adaptive_lengths(self) -> tuple[int, ...]:
        """The draft lengths the adaptive choice picks from: none, and each of params.adaptive."""
        return (0, *sorted(set(self.params.adaptive)))

    def _max_k(self) -> int:
        return max(*self.lengths.values(), *self.params.adaptive, 0)


def _param_problems(params) -> list[str]:
    problems = []
    buckets = buckets_up_to(max(params.max_rows, 1))
    lengths = {**dict.fromkeys(buckets, params.draft_length), **params.draft_lengths}
    if any(k < 0 for k in lengths.values()):
        problems.append(f"params.draft_length(s) must be >= 0, got {lengths}")
    if any(lengths.values()) and not params.draft_path:
        problems.append("params.draft_length(s) > 0 drafts with an EAGLE head: set params.draft_path")
    if params.adaptive:
        if not params.draft_path or any(k < 1 for k in params.adaptive):
            problems.append(f"params.adaptive chooses among draft lengths >= 1 drafted with an EAGLE head "
                            f"(params.draft_path), got {params.adaptive}")
        if any(lengths.values()):
            problems.append("params.adaptive chooses the draft lengths: leave params.draft_length(s) unset")
        if not 0 <= params.adaptive_rate <= 1 or params.profile_steps < 1:
            problems.append(f"params.adaptive_rate must be in [0, 1] and params.profile_steps >= 1, got "
                            f"{params.adaptive_rate}, {params.profile_steps}")
    if unknown := sorted(set(params.draft_lengths) - set(buckets)):
        problems.append(f"params.draft_lengths names {unknown}, which are not batch buckets ({buckets})")
    for key in ("max_rows", "max_len", "max_new_tokens"):
        if getattr(params, key) < 1:
            problems.append(f"params.{key} must be >= 1, got {getattr(params, key)}")
    if params.gather_s < 0:
        problems.append(f"params.gather_s must be >= 0, got {params.gather_s}")
    return problems
