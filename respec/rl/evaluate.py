"""Accuracy of a policy on a fixed held-out set of the task's problems.

The held-out set is `task.heldout(count, seed)`: the same problems at step 0 and at the
end of a run (and across runs); PromptSource skips these prompts when it poses training
problems. Two numbers per evaluation:

- `accuracy`: the fraction of correct answers over `samples` draws per problem at the
  run's sampling temperature (what RL optimises: the probability that a sample is right);
- `greedy_accuracy`: one greedy answer per problem.

Generation uses the project's own engine (plain decoding, no drafter), with a seeded
sampler, so an evaluation of the same weights gives the same numbers.
"""

from __future__ import annotations

import torch

from respec.engine.model import CausalLM
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.engine.tokenizer import TextTokenizer
from respec.tasks.base import Problem, Task


def evaluate(model: CausalLM, tokenizer: TextTokenizer, task: Task, problems: list[Problem], temperature: float = 1.0,
             samples: int = 4, max_new_tokens: int = 64, seed: int = 0, max_rows: int = 128) -> dict[str, float]:
    prompts = [torch.tensor([tokenizer.bos_id, *tokenizer.encode(p.prompt)]) for p in problems]
    greedy = _correct(model, tokenizer, task, problems, prompts, 0.0, max_new_tokens, seed, max_rows)
    sampled = _correct(model, tokenizer, task, problems * samples, prompts * samples, temperature,
                       max_new_tokens, seed, max_rows) if temperature > 0 else greedy
    return {"accuracy": sum(sampled) / len(sampled), "greedy_accuracy": sum(greedy) / len(greedy)}


def _correct(model, tokenizer, task, problems, prompts, temperature, max_new_tokens, seed, max_rows) -> list[bool]:
    longest = max(len(p) for p in prompts)
    engine = SpeculativeEngine(model, None, max_rows=min(max_rows, len(prompts)),
                               max_len=longest + max_new_tokens + 1, seed=seed)
    sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,))
    rows = engine.generate(prompts, sampling)
    return [task.check(_response_text(tokenizer, row.tokens), problem).correct
            for row, problem in zip(rows, problems, strict=True)]


def _response_text(tokenizer: TextTokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
