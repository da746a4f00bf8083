"""Generator: owns the rollout rows and the drafter; turns Prompts into Rollouts.

Its loop: admit waiting prompts into free rows, draft a tree per active row (or nothing
when the Scheduler says SD is off), ask the Verifier to verify (one request per step, new
rows and freed slots ride along), append what was accepted, and send each finished row
as a Rollout with every token's behaviour log-probability and policy version. Drafter
weights and scheduling decisions are swapped in between steps.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import msgspec
import numpy as np
import torch

from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.ngram import NgramDrafter
from respec.engine.speculative import Row, RowBook
from respec.engine.target import Verified
from respec.messages import (
    DraftWeights,
    Envelope,
    GenerationStats,
    Prompt,
    Rollout,
    SchedulerDecision,
    VerifyRequest,
    VerifyResult,
)
from respec.runtime import Actor, handles

DRAFTERS = {"none": lambda: None, "ngram": NgramDrafter}


class Generator(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        max_rows: int = 64  # must not exceed the Verifier's
        drafter: str = "ngram"  # "ngram" or "none" (model drafters plug in here)
        shape: str = "s4_t1_n4"  # the draft shape until the Scheduler decides; "nosd": off
        stats_every: int = 0  # send GenerationStats every N steps (0: never)

    sends = (VerifyRequest, Rollout, GenerationStats)

    async def on_start(self) -> None:
        if self.params.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.params.drafter!r}; one of {', '.join(DRAFTERS)}")
        self.book = RowBook(DRAFTERS[self.params.drafter]())
        self.shape = None if self.params.shape == "nosd" else DraftShape.parse(self.params.shape)
        self.waiting: deque[Prompt] = deque()
        self.prompts: dict[int, Prompt] = {}  # row id -> its prompt message
        self.versions: dict[int, list[int]] = {}  # row id -> policy version of each token
        self.started: dict[int, float] = {}
        self.freed: list[int] = []
        self.step_count = 0
        self.wake = asyncio.Event()

    @handles(Prompt)
    async def on_prompt(self, prompt: Prompt, envelope: Envelope) -> None:
        self.waiting.append(prompt)
        self.wake.set()

    @handles(SchedulerDecision, optional=True)
    async def on_decision(self, decision: SchedulerDecision, envelope: Envelope) -> None:
        self.shape = DraftShape(decision.steps, decision.branch, decision.num_draft) if decision.speculate else None

    @handles(DraftWeights, optional=True)
    async def on_draft_weights(self, weights: DraftWeights, envelope: Envelope) -> None:
        if self.book.drafter is not None:
            self.book.drafter.load_weights(weights.handle.tensors or {}, weights.version)

    async def run(self) -> None:
        while True:
            if not self.book.rows and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            await self._step()

    async def _step(self) -> None:
        rows = list(self.book.rows.values())
        admitted = [self.waiting.popleft() for _ in range(min(len(self.waiting), self._free_rows()))]
        request = self._request(rows, admitted)
        started = time.perf_counter()
        result: VerifyResult = await self.request(request)
        version = result.policy_version
        new_rows = [self._open(int(slot), prompt) for slot, prompt in zip(result.slots[: len(admitted)], admitted,
                                                                            strict=True)]
        verified = _verified(result)
        first = _select(verified, slice(0, len(admitted)))
        done = self.book.apply(new_rows, first, is_step=False) + self.book.apply(rows, _select(verified, slice(len(admitted), None)))
        for row in new_rows + rows:
            self.versions[row.row_id] += [version] * (len(row.tokens) - len(self.versions[row.row_id]))
        for row in done:
            await self._finish(row)
        self.step_count += 1
        if self.params.stats_every and self.step_count % self.params.stats_every == 0:
            await self._stats(rows, verified, time.perf_counter() - started)

    def _free_rows(self) -> int:
        return self.params.max_rows - len(self.book.rows)

    def _request(self, rows: list[Row], admitted: list[Prompt]) -> VerifyRequest:
        tree, draft_probs = self.book.draft(rows, self.shape)
        roots = torch.tensor([row.tokens[-1] for row in rows], dtype=torch.long)
        freed, self.freed = self.freed, []
        return VerifyRequest(
            step=self.step_count, slots=np.array([r.slot for r in rows], dtype=np.int32),
            tokens=tree.verify_tokens(roots).numpy().astype(np.int32),
            parents=tree.parents.numpy().astype(np.int32), num_nodes=tree.num_nodes.numpy().astype(np.int32),
            draft_probs=None if draft_probs is None else draft_probs.float().numpy(),
            new_rows=admitted, finished_slots=np.array(freed, dtype=np.int32),
        )

    def _open(self, slot: int, prompt: Prompt) -> Row:
        row = self.book.open(slot, torch.from_numpy(np.asarray(prompt.tokens, np.int64)), prompt.sampling)
        self.prompts[row.row_id] = prompt
        self.versions[row.row_id] = []
        self.started[row.row_id] = time.perf_counter()
        return row

    async def _finish(self, row: Row) -> None:
        self.freed.append(row.slot)
        prompt = self.prompts.pop(row.row_id)
        rollout = Rollout(
            prompt=prompt, tokens=np.array(row.tokens, dtype=np.int32), logprobs=np.array(row.logprobs, dtype=np.float32),
            token_versions=np.array(self.versions.pop(row.row_id), dtype=np.int32), finish_reason=row.finish_reason,
            accept_len=(len(row.tokens) - 1) / max(row.steps, 1), gen_time_s=time.perf_counter() - self.started.pop(row.row_id),
        )
        await self.send(rollout, correlation_id=prompt.prompt_id)

    async def _stats(self, rows: list[Row], verified: Verified, seconds: float) -> None:
        await self.send(GenerationStats(
            active_rows=len(self.book.rows), waiting_prompts=len(self.waiting),
            config=self.shape.name if self.shape else "nosd", step_time_s=seconds,
            tokens_emitted=int(verified.num_tokens.sum()), mean_accept_len=float(verified.num_tokens.float().mean()),
            context_len_mean=float(np.mean([len(r.prompt) + len(r.tokens) for r in rows])) if rows else 0.0,
        ))


def _verified(result: VerifyResult) -> Verified:
    tokens = torch.from_numpy(np.asarray(result.tokens, np.int64))
    accepted = torch.from_numpy(np.asarray(result.num_accepted, np.int64))
    return Verified(tokens, torch.from_numpy(np.asarray(result.logprobs, np.float32)), accepted + 1, accepted)


def _select(verified: Verified, rows: slice) -> Verified:
    return Verified(verified.tokens[rows], verified.logprobs[rows], verified.num_tokens[rows], verified.num_accepted[rows])
