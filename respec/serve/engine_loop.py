"""One SpeculativeEngine serving every request: continuous batching under one asyncio task.

Only the loop task touches the engine. Request handlers `submit` and `cancel`; the loop
drains both between steps, admits waiting requests into free rows (each prefilled on
its own: prompts of different lengths do not share a prefill), runs one verification
step over every active row, and posts each request's new tokens to its queue. The
engine work of one tick runs in a worker thread, so the event loop keeps serving HTTP
(streams, new requests, disconnects) while the model runs.

Why this module steps the engine itself rather than calling `SpeculativeEngine.step`:
the endpoint reports acceptance per request, and `step` returns only the batch's sum.
The step below is `step`'s own sequence (draft, verify, apply, release) over the same
`RowBook` and `TargetRunner`, keeping the per-row `Verified` counts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from respec.engine.speculative import Row, Sampling, SpeculativeEngine
from respec.sched.profile import NOSD
from respec.serve.shape import ShapeChooser


@dataclass(frozen=True)
class Progress:
    """What one tick did for one request. `tokens` are new ids (the last may be a stop id)."""

    tokens: tuple[int, ...] = ()
    accepted: int = 0  # draft tokens among `tokens`
    steps: int = 0  # verification steps this tick (0 or 1; 0 for the prefill's first token)
    config: str = ""  # the draft shape that step ran ("nosd": plain decoding)
    finish_reason: str = ""  # "stop" (a stop id), "length", "error"; "" = still running
    error: str = ""
    fault: bool = False  # the engine failed (a server error), rather than refused this request


@dataclass(eq=False)
class Submission:
    prompt: list[int]
    sampling: Sampling
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # Progress, in order
    row_id: int | None = None  # set once admitted
    sent: int = 0  # tokens of the row already posted
    done: bool = False


class ServingEngine:
    def __init__(self, engine: SpeculativeEngine, chooser: ShapeChooser) -> None:
        self.engine, self.chooser = engine, chooser
        self.max_rows = engine.target.cache.num_slots
        self.waiting: list[Submission] = []
        self.cancelled: list[Submission] = []
        self.active: dict[int, Submission] = {}  # row id -> submission
        self.counts = {"admitted": 0, "finished": 0, "aborted": 0, "rejected": 0, "steps": 0}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ handler side

    def submit(self, prompt: list[int], sampling: Sampling) -> Submission:
        self._ensure_running()
        submission = Submission(prompt, sampling)
        self.waiting.append(submission)
        self._wake.set()
        return submission

    def cancel(self, submission: Submission) -> None:
        """Free the request's row at the next tick (a no-op once it finished)."""
        if submission.done:
            return
        submission.done = True
        if submission in self.waiting:
            self.waiting.remove(submission)
        else:
            self.cancelled.append(submission)
            self._wake.set()

    def health(self) -> dict:
        return {"max_rows": self.max_rows, "free_rows": self.engine.target.free_slots,
                "active_rows": len(self.engine.rows), "waiting": len(self.waiting), **self.counts}

    def _ensure_running(self) -> None:
        # Started from the first request, so the task lives on the loop that serves requests.
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            if not (self.waiting or self.cancelled or self.engine.rows):
                self._wake.clear()
                await self._wake.wait()
            cancels, self.cancelled = self.cancelled, []
            free = self.engine.target.free_slots + sum(s.row_id in self.engine.rows for s in cancels)
            admits, self.waiting = self.waiting[:free], self.waiting[free:]
            try:
                updates = await asyncio.to_thread(self._tick, cancels, admits)
            except Exception as error:  # a fault in the engine must not leave requests waiting forever
                updates = self._fail_all(admits, error)
            for submission, progress in updates:
                submission.done = submission.done or bool(progress.finish_reason)
                submission.updates.put_nowait(progress)

    def _tick(self, cancels: list[Submission], admits: list[Submission]) -> list[tuple[Submission, Progress]]:
        for submission in cancels:
            self._abort(submission)
        updates = [update for submission in admits for update in self._admit(submission)]
        if self.engine.rows:
            updates += self._step()
        return updates

    def _fail_all(self, admits: list[Submission], error: Exception) -> list[tuple[Submission, Progress]]:
        """Every request in flight ends with the error; their rows are freed."""
        failed = list(dict.fromkeys([*admits, *self.active.values()]))  # admitted ones are in both
        for submission in list(self.active.values()):
            self._abort(submission)
        message = f"{type(error).__name__}: {error}"
        return [(s, Progress(finish_reason="error", error=message, fault=True)) for s in failed]

    def _abort(self, submission: Submission) -> None:
        """Drop a running row: its KV slot and the drafter's state for it go back."""
        self.active.pop(submission.row_id, None)
        row = self.engine.book.rows.pop(submission.row_id, None)
        if row is None:
            return  # finished in the meantime
        if self.engine.book.drafter is not None:
            self.engine.book.drafter.release_row(row.row_id)
        self.engine.target.release(row.slot)
        self.counts["aborted"] += 1

    def _admit(self, submission: Submission) -> list[tuple[Submission, Progress]]:
        try:
            (row_id,) = self.engine.add([torch.tensor(submission.prompt)], submission.sampling, self.chooser.reserve)
        except (ValueError, RuntimeError) as error:  # the engine's own admission checks
            self.counts["rejected"] += 1
            return [(submission, Progress(finish_reason="error", error=f"{type(error).__name__}: {error}"))]
        submission.row_id = row_id
        self.active[row_id] = submission
        self.counts["admitted"] += 1
        return self._collect({row_id: 0}, 0, "")

    def _step(self) -> list[tuple[Submission, Progress]]:
        engine = self.engine
        rows = list(engine.book.rows.values())
        context = sum(len(r.prompt) + len(r.tokens) for r in rows) / len(rows)
        shape = self.chooser.choose(len(rows), context)
        start = time.perf_counter()
        tree, draft_probs = engine.book.draft(rows, shape)
        roots = torch.tensor([row.tokens[-1] for row in rows])
        verified = engine.target.verify([r.slot for r in rows], roots, tree, draft_probs, [r.sampling for r in rows])
        for row in engine.book.apply(rows, verified):
            engine.target.release(row.slot)
        config = shape.name if shape else NOSD
        self.chooser.observe(config, len(rows), context, time.perf_counter() - start,
                             float(verified.num_tokens.float().mean()))
        self.counts["steps"] += 1
        accepted = {row.row_id: int(verified.num_accepted[b]) for b, row in enumerate(rows)}
        return self._collect(accepted, 1, config)

    def _collect(self, accepted: dict[int, int], steps: int, config: str) -> list[tuple[Submission, Progress]]:
        """Each row's tokens since the last post; finished rows leave the engine's books."""
        finished = {row.row_id: row for row in self.engine.book.finished}
        self.engine.book.finished.clear()  # a server's list would grow without end
        updates = []
        for row_id, drafts in accepted.items():
            row: Row | None = self.engine.book.rows.get(row_id) or finished.get(row_id)
            submission = self.active.get(row_id)
            if row is None or submission is None:
                continue
            new = tuple(row.tokens[submission.sent:])
            submission.sent = len(row.tokens)
            if row.finish_reason:
                self.active.pop(row_id)
                self.counts["finished"] += 1
            # a row that stops mid-step keeps only part of what was accepted
            updates.append((submission, Progress(new, min(drafts, len(new)), steps, config, row.finish_reason)))
        return updates
