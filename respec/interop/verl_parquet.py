"""Rows in verl's dataset layout (the Parquet files verl's ``examples/data_preprocess``
scripts write, e.g. GSM8K or MATH), turned into respec ``Problem``s.

A verl row has
    prompt        a list of chat messages, ``[{"role": "user", "content": "..."}, ...]``
    reward_model  ``{"style": "rule", "ground_truth": "..."}``: the reference answer
    data_source   which dataset the row came from (verl picks its scorer by it)
and optionally ``ability`` and ``extra_info`` (split, index, ...), kept in ``Problem.meta``
with the messages. The answer is checked by the dataset task's own checker (the last
``\\boxed{}`` or number) or a ``reward_fn``; verl's per-``data_source`` scorers are not
reproduced, and a ``reward_fn`` is called with (response, answer, prompt) only.

The chat messages become the prompt text either through a tokenizer's chat template
(``chat_template``: a local tokenizer directory whose tokenizer_config.json has one,
rendered by transformers, with the assistant turn opened) or, without one, as the messages'
contents joined by blank lines (what a model without a chat format, such as the built-in
tiny policy, reads).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from respec.tasks.base import Problem

ROLES = ("system", "user", "assistant", "tool")


class VerlRowError(ValueError):
    """A row that claims verl's layout but breaks it; the message says which field."""


def is_verl_row(row: dict) -> bool:
    """verl's layout: chat-message prompt or a reward_model field (respec's own rows have
    a string prompt and an ``answer``)."""
    return isinstance(row.get("prompt"), list | tuple) or "reward_model" in row


def verl_problem(row: dict, render: Callable[[list[dict]], str]) -> Problem:
    messages = _messages(row.get("prompt"))
    answer = _ground_truth(row.get("reward_model"))
    meta = {"data_source": str(row.get("data_source") or ""), "messages": messages}
    for key in ("ability", "extra_info"):
        if row.get(key) is not None:
            meta[key] = row[key]
    return Problem(prompt=render(messages), answer=answer, meta=meta)


def plain_render(messages: list[dict]) -> str:
    return "\n\n".join(message["content"] for message in messages)


def template_render(tokenizer_dir: str) -> Callable[[list[dict]], str]:
    """Render with the chat template of the tokenizer in `tokenizer_dir` (local only)."""
    tokenizer = _load_chat_tokenizer(str(Path(tokenizer_dir).resolve()))

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


@lru_cache(maxsize=4)
def _load_chat_tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():
        raise VerlRowError(f"chat_template: {directory} is not a tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise VerlRowError(f"chat_template: {directory}/tokenizer_config.json has no 'chat_template'")
    return tokenizer


def _messages(prompt: object) -> list[dict]:
    if not isinstance(prompt, list | tuple) or not prompt:
        raise VerlRowError("'prompt' must be a non-empty list of chat messages ({'role', 'content'})")
    messages = []
    for index, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise VerlRowError(f"prompt[{index}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise VerlRowError(f"prompt[{index}] has role {message.get('role')!r}, expected one of {ROLES}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _ground_truth(reward_model: object) -> str:
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise VerlRowError("'reward_model' must be an object with 'ground_truth'")
    truth = reward_model["ground_truth"]
    if isinstance(truth, list | tuple) and len(truth) == 1:  # some sources wrap one answer in a list
        truth = truth[0]
    if isinstance(truth, bool) or not isinstance(truth, str | int | float) or str(truth).strip() == "":
        raise VerlRowError(f"'reward_model.ground_truth' must be one non-empty string or number, got {truth!r}")
    return str(truth)
