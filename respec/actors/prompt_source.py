"""PromptSource: poses the task's problems as GRPO groups of G prompts.

Group k's problem is a pure function of (seed, k), so the data order is reproducible and
a resumed run knows what to pose from the checkpoint's list of trained groups alone.
Problems of the held-out evaluation set are never posed.

It keeps at most (policy version + 1 + max_staleness) * groups_per_step groups posed,
counting a group as trained when the policy version that follows it arrives; this bounds
how many versions old a rollout can be when it is trained on. max_staleness = 0 is the
synchronous loop: the next step's prompts wait for the weights of the last one.

Each prompt carries the oldest policy version the bound lets generate it
(`Prompt.min_policy_version`): the version at which its group became allowed. The
PolicyWeights that let the PromptSource pose it reach the Verifier on another socket, so
the prompt may get there first; the Verifier holds it until that version is loaded.
"""

from __future__ import annotations

import asyncio
import random

import msgspec
import numpy as np

from respec.engine.tokenizer import load_tokenizer
from respec.messages import Envelope, PolicyWeights, Prompt, SamplingParams, ScoredRollout
from respec.rl import checkpoints
from respec.runtime import Actor, handles
from respec.tasks import Problem, make_task


class PromptSource(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        tokenizer_path: str
        task: str = "arithmetic"
        task_params: dict = {}
        group_size: int = 8
        groups_per_step: int = 4  # the trainer's
        max_staleness: int = 1  # policy versions a rollout may lag behind (0: synchronous)
        temperature: float = 1.0
        max_new_tokens: int = 48
        seed: int = 0
        max_groups: int = 0  # stop posing after this many groups (0: never)
        eval_problems: int = 0  # the trainer's held-out set, never posed for training
        eval_seed: int = 12345

    sends = (Prompt,)
    reads_weights = False  # PolicyWeights tell it the version and the trained groups

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        """The trainer must agree on the group shape and hold every group the staleness
        bound lets be in flight at once."""
        problems = []
        in_flight = (params.max_staleness + 1) * params.groups_per_step
        for trainer in plan.handlers_of(ScoredRollout):
            other = plan.actors[trainer].params
            for key in ("group_size", "groups_per_step"):
                if hasattr(other, key) and getattr(other, key) != getattr(params, key):
                    problems.append(f"params.{key} is {getattr(params, key)} but actors.{trainer}.params.{key} "
                                    f"is {getattr(other, key)}: the two must be equal")
            buffer = getattr(other, "buffer_groups", None)
            if buffer is not None and in_flight > buffer:
                problems.append(
                    f"params.max_staleness {params.max_staleness} lets (max_staleness + 1) * groups_per_step = "
                    f"{in_flight} groups be in flight, more than actors.{trainer}.params.buffer_groups "
                    f"({buffer}) holds: lower max_staleness or raise buffer_groups")
        return problems

    async def on_start(self) -> None:
        self.tokenizer = load_tokenizer(self.params.tokenizer_path)
        self.task = make_task(self.params.task, **self.params.task_params)
        self.held_out = {p.prompt for p in self.task.heldout(self.params.eval_problems, self.params.eval_seed)}
        self.next_group = 0
        self.again: list[int] = []  # groups to pose before new ones (untrained after a resume or a crash)
        self.trained: set[int] = set()  # groups the trainer has trained on (from PolicyWeights)
        self.policy_version = 0
        self.waiting_for_version = 0  # a resumed run waits for the checkpoint's weights first
        self.changed = asyncio.Event()
        if self.resuming:
            self._restore()

    def _restore(self) -> None:
        latest = checkpoints.latest_checkpoint(self.run_dir)
        if latest is None:
            return
        meta = checkpoints.load_meta(latest)
        self.trained = set(meta.trained_groups)
        self.next_group = meta.next_group
        self.again = [g for g in range(self.next_group) if g not in self.trained]
        self.policy_version = -1  # not serving until the trainer republishes meta.policy_version
        self.waiting_for_version = meta.policy_version
        self.log.info("resumed", next_group=self.next_group, again=self.again)

    @handles(PolicyWeights, optional=True)
    async def on_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        self.trained.update(weights.trained_groups)
        if weights.version >= self.waiting_for_version:
            self.policy_version = weights.version
            self.changed.set()

    async def on_peer_restarted(self, group: str) -> None:
        """A process died with rollouts in flight: pose every untrained group again (same
        ids, same problems); the trainer keeps one rollout per sample and skips trained groups."""
        again = [g for g in range(self.next_group) if g not in self.trained and g not in self.again]
        self.again += again
        self.log.warning("posing_again", groups=again, after=group)
        self.changed.set()

    def _posed(self) -> int:
        """Groups posed and not waiting to be posed again (what the staleness bound counts)."""
        return self.next_group - len(self.again)

    def _may_send(self) -> bool:
        """Groups for versions up to policy_version + max_staleness may be in flight."""
        if self.policy_version < 0:
            return False
        allowed = (self.policy_version + self.params.max_staleness + 1) * self.params.groups_per_step
        return self._posed() < allowed

    async def run(self) -> None:
        sampling = SamplingParams(temperature=self.params.temperature, max_new_tokens=self.params.max_new_tokens,
                                  stop_token_ids=(self.tokenizer.eos_id,))
        while self.again or not self.params.max_groups or self.next_group < self.params.max_groups:
            while not self._may_send():
                self.changed.clear()
                await self.changed.wait()
            min_version = self._min_version()
            if self.again:
                await self._send_group(self.again.pop(0), sampling, min_version)
            else:
                await self._send_group(self.next_group, sampling, min_version)
                self.next_group += 1

    def _min_version(self) -> int:
        """The oldest policy version the next group posed may be generated with: the bound
        lets the p-th group be posed from policy version p // groups_per_step - max_staleness
        on (_may_send), so that is its minimum; never newer than the version known here."""
        return max(0, self._posed() // self.params.groups_per_step - self.params.max_staleness)

    def problem(self, group: int) -> Problem:
        """Group `group`'s problem: the same for every run with this seed."""
        rng = random.Random(f"{self.params.seed}/{group}")
        while True:
            problem = self.task.sample(rng)
            if problem.prompt not in self.held_out:
                return problem

    async def _send_group(self, group: int, sampling: SamplingParams, min_version: int) -> None:
        problem = self.problem(group)
        group_id = f"g{group}"
        tokens = np.array([self.tokenizer.bos_id, *self.tokenizer.encode(problem.prompt)], dtype=np.int32)
        for index in range(self.params.group_size):
            await self.send(Prompt(prompt_id=f"{group_id}/{index}", group_id=group_id, sample_index=index,
                                   tokens=tokens, sampling=sampling, task=self.task.name, answer=problem.answer,
                                   text=problem.prompt, min_policy_version=min_version))
