"""Actors for the Generator/Verifier graph tests: a prompt source and a rollout sink."""

from __future__ import annotations

import json

import msgspec
import numpy as np

from respec.messages import Envelope, Prompt, Rollout, SamplingParams, ScoredRollout
from respec.runtime import Actor, handles


class FixedPrompts(Actor):
    """Sends the prompts listed in a JSON file (lists of token ids), greedy or sampled."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        prompts_file: str
        max_new_tokens: int = 16
        temperature: float = 0.0

    sends = (Prompt,)

    async def run(self) -> None:
        prompts = json.loads(open(self.params.prompts_file).read())
        sampling = SamplingParams(temperature=self.params.temperature, max_new_tokens=self.params.max_new_tokens)
        for index, tokens in enumerate(prompts):
            await self.send(Prompt(prompt_id=f"p{index}", group_id=f"p{index}", sample_index=0,
                                   tokens=np.array(tokens, dtype=np.int32), sampling=sampling))
        await _forever()


class PromptsWithSampling(Actor):
    """Sends the prompts listed in a JSON file as {"tokens": [...], "sampling": {...}}, each
    with its own sampling parameters (valid or not: nothing is checked here)."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        prompts_file: str

    sends = (Prompt,)

    async def run(self) -> None:
        for index, entry in enumerate(json.loads(open(self.params.prompts_file).read())):
            sampling = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 16, **entry.get("sampling", {})})
            await self.send(Prompt(prompt_id=f"p{index}", group_id=f"p{index}", sample_index=0,
                                   tokens=np.array(entry["tokens"], dtype=np.int32), sampling=sampling))
        await _forever()


class RolloutFile(Actor):
    """Writes every rollout's tokens to a JSON file; ends the run when all have come."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        out_file: str
        expected: int

    async def on_start(self) -> None:
        self.rollouts: dict[str, dict] = {}

    @handles(Rollout)
    async def on_rollout(self, rollout: Rollout, envelope: Envelope) -> None:
        self.rollouts[rollout.prompt.prompt_id] = {
            "tokens": rollout.tokens.tolist(), "logprobs": rollout.logprobs.tolist(),
            "versions": rollout.token_versions.tolist(), "accept_len": rollout.accept_len,
            "finish_reason": rollout.finish_reason, "error": rollout.error,
        }
        if len(self.rollouts) == self.params.expected:
            with open(self.params.out_file, "w") as stream:
                json.dump(self.rollouts, stream)
            self.finish_run("all rollouts")


async def _forever() -> None:
    import asyncio

    await asyncio.Event().wait()


class RolloutsFromText(Actor):
    """Sends one Rollout per response text (for RewardScorer tests)."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        tokenizer_path: str
        responses: list[str]
        answer: str = "7"

    sends = (Rollout,)

    async def run(self) -> None:
        from respec.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.params.tokenizer_path)
        for index, text in enumerate(self.params.responses):
            tokens = np.array(tokenizer.encode(text), dtype=np.int32)
            prompt = Prompt(prompt_id=f"r{index}", group_id="g", sample_index=index,
                            tokens=np.array(tokenizer.encode("3+4="), dtype=np.int32), answer=self.params.answer,
                            text="3+4=")
            await self.send(Rollout(prompt=prompt, tokens=tokens, logprobs=np.zeros(len(tokens), np.float32),
                                    token_versions=np.zeros(len(tokens), np.int32), finish_reason="stop"))
        await _forever()


class ScoreFile(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        out_file: str
        expected: int

    async def on_start(self) -> None:
        self.scores: dict[str, dict] = {}

    @handles(ScoredRollout)
    async def on_scored(self, scored: ScoredRollout, envelope: Envelope) -> None:
        self.scores[scored.rollout.prompt.prompt_id] = {"reward": scored.reward, "correct": scored.correct,
                                                        "error": scored.error}
        if len(self.scores) == self.params.expected:
            with open(self.params.out_file, "w") as stream:
                json.dump(self.scores, stream)
            self.finish_run("scored")
