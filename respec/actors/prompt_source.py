"""PromptSource: poses the task's problems as GRPO groups of G prompts.

It keeps at most `max_groups_in_flight` groups outstanding (sent but not yet trained on),
counting a group as trained when the policy version that follows it arrives; with
`max_staleness` this bounds how old a rollout can be when it is trained on.
"""

from __future__ import annotations

import asyncio
import random

import msgspec
import numpy as np

from respec.engine.tokenizer import load_tokenizer
from respec.messages import Envelope, PolicyWeights, Prompt, SamplingParams
from respec.runtime import Actor, handles
from respec.tasks import make_task


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

    sends = (Prompt,)

    async def on_start(self) -> None:
        self.tokenizer = load_tokenizer(self.params.tokenizer_path)
        self.task = make_task(self.params.task, **self.params.task_params)
        self.rng = random.Random(self.params.seed)
        self.sent_groups = 0
        self.policy_version = 0
        self.changed = asyncio.Event()

    @handles(PolicyWeights, optional=True)
    async def on_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        self.policy_version = weights.version
        self.changed.set()

    def _may_send(self) -> bool:
        """Groups for versions up to policy_version + max_staleness may be in flight."""
        allowed = (self.policy_version + self.params.max_staleness + 1) * self.params.groups_per_step
        return self.sent_groups < allowed

    async def run(self) -> None:
        sampling = SamplingParams(temperature=self.params.temperature, max_new_tokens=self.params.max_new_tokens,
                                  stop_token_ids=(self.tokenizer.eos_id,))
        while not self.params.max_groups or self.sent_groups < self.params.max_groups:
            while not self._may_send():
                self.changed.clear()
                await self.changed.wait()
            await self._send_group(sampling)

    async def _send_group(self, sampling: SamplingParams) -> None:
        problem = self.task.sample(self.rng)
        group_id = f"g{self.sent_groups}"
        tokens = np.array([self.tokenizer.bos_id, *self.tokenizer.encode(problem.prompt)], dtype=np.int32)
        for index in range(self.params.group_size):
            await self.send(Prompt(prompt_id=f"{group_id}/{index}", group_id=group_id, sample_index=index,
                                   tokens=tokens, sampling=sampling, task=self.task.name, answer=problem.answer,
                                   text=problem.prompt))
        self.sent_groups += 1
