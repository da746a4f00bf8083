"""RewardScorer: turns a finished rollout into a reward, and forwards what distillation needs.

A checker that raises or runs past `timeout_s` gives reward 0 with the error recorded on
the ScoredRollout: a rollout is never lost to a bad checker.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import msgspec
import numpy as np

from respec.engine.tokenizer import load_tokenizer
from respec.messages import DistillSample, Envelope, Rollout, ScoredRollout
from respec.runtime import Actor, handles
from respec.tasks import CheckResult, Problem, make_task


class CheckTimeout(Exception):
    pass


class RewardScorer(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        tokenizer_path: str  # directory with tokenizer.json (the policy's checkpoint)
        task: str = "arithmetic"
        task_params: dict = {}
        reward_fn: str = ""  # "package.module:function" replaces the task's checker
        timeout_s: float = 2.0  # a check that takes longer scores 0

    sends = (ScoredRollout,)
    optional_sends = (DistillSample,)

    async def on_start(self) -> None:
        self.tokenizer = load_tokenizer(self.params.tokenizer_path)
        self.task = make_task(self.params.task, reward_fn=self.params.reward_fn, **self.params.task_params)

    @handles(Rollout)
    async def on_rollout(self, rollout: Rollout, envelope: Envelope) -> None:
        received_at, started = time.time(), time.perf_counter()
        response = self.tokenizer.decode([t for t in rollout.tokens.tolist() if t != self.tokenizer.eos_id])
        problem = Problem(prompt=rollout.prompt.text, answer=rollout.prompt.answer)
        result = self._check(response, problem)
        if result.error:
            self.log.warning("checker_failed", prompt_id=rollout.prompt.prompt_id, error=result.error)
        await self.send(ScoredRollout(rollout=rollout, reward=result.reward, correct=result.correct, error=result.error,
                                      received_at=received_at, score_s=time.perf_counter() - started),
                        correlation_id=envelope.correlation_id)
        prompt = np.asarray(rollout.prompt.tokens, np.int32)
        await self.send(DistillSample(
            prompt_id=rollout.prompt.prompt_id, policy_version=int(rollout.token_versions[-1]) if len(rollout.tokens) else -1,
            tokens=np.concatenate([prompt, np.asarray(rollout.tokens, np.int32)]), response_start=len(prompt),
            reward=result.reward,
        ), correlation_id=envelope.correlation_id)

    def _check(self, response: str, problem: Problem) -> CheckResult:
        try:
            with _time_limit(self.params.timeout_s):
                return self.task.check(response, problem)
        except CheckTimeout:
            return CheckResult(0.0, False, f"checker timed out after {self.params.timeout_s}s")
        except Exception as error:  # noqa: BLE001 - a user's checker may raise anything
            return CheckResult(0.0, False, f"checker raised {type(error).__name__}: {error}")


@contextlib.contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based limit (actors run on the main thread of their process); elsewhere none.
    It interrupts Python code, not a call blocked inside C."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
