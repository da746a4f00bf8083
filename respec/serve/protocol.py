"""The OpenAI request and response bodies `/v1/completions` and `/v1/chat/completions` take.

Requests are pydantic models: a wrong type or an out-of-range value (temperature outside
[0, 2], top_p outside (0, 1], max_tokens < 1, more than 4 stop strings) is a 400 with
OpenAI's error body naming the field. Fields that would change the answer but are not
implemented (n > 1, logprobs, echo, penalties, tools, ...) are refused by name rather
than silently ignored; unknown fields are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI's limit on stop strings


class OpenAIError(Exception):
    """An error the client caused, answered with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""  # any name is served by the one model; responses name it
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty strings")
        return stops

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something this server does not implement: name -> value."""
        found = {"n": self.n not in (None, 1), "presence_penalty": bool(self.presence_penalty),
                 "frequency_penalty": bool(self.frequency_penalty), "logit_bias": bool(self.logit_bias),
                 # a row's stream is keyed by the order the replica admits rows, not by a
                 # seed: one request's samples are not repeatable yet (greedy needs none)
                 "seed": self.seed is not None and self.temperature > 0}
        return {name: getattr(self, name) for name, bad in found.items() if bad}


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, Any]:
        found = {"echo": self.echo, "logprobs": self.logprobs is not None, "suffix": bool(self.suffix),
                 "best_of": self.best_of not in (None, 1)}
        return {**super().unsupported(), **{name: getattr(self, name) for name, bad in found.items() if bad}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> dict[str, Any]:
        found = {"logprobs": bool(self.logprobs), "tools": bool(self.tools),
                 "response_format": (self.response_format or {}).get("type", "text") != "text"}
        return {**super().unsupported(), **{name: getattr(self, name) for name, bad in found.items() if bad}}

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def refuse_unsupported(request: _Request) -> None:
    for name, value in request.unsupported().items():
        raise OpenAIError(f"{name}={value!r} is not supported by this server", param=name, code="unsupported_parameter")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) from pydantic's errors: each field and what was wrong with it."""
    parts, param = [], None
    for error in errors:
        location = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})")
            continue
        name = ".".join(location) or "body"
        param = param or name
        parts.append(f"{name}: {error['msg']}")
    return "; ".join(parts) or "invalid request", param


# ---------------------------------------------------------------------- responses


@dataclass
class Acceptance:
    """A request's speculative-decoding statistics (reported only when a drafter serves)."""

    accepted_tokens: int = 0  # draft tokens that became output
    verification_steps: int = 0  # target passes over this request's row
    configs: Counter = field(default_factory=Counter)  # steps per draft shape ("nosd": none drafted)

    def add(self, accepted: int, steps: int, config: str) -> None:
        self.accepted_tokens += accepted
        self.verification_steps += steps
        if steps and config:
            self.configs[config] += steps

    def body(self) -> dict:
        steps = self.verification_steps
        return {"accepted_tokens": self.accepted_tokens, "verification_steps": steps,
                "mean_accepted_per_step": round(self.accepted_tokens / steps, 4) if steps else 0.0,
                "draft_shapes": dict(self.configs)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def response(chat: bool, request_id: str, model: str, text: str, finish_reason: str, usage_: dict,
             acceptance: Acceptance | None) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": finish_reason} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
    body = {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage_}
    return body | ({"respec": acceptance.body()} if acceptance else {})


def chunk(chat: bool, request_id: str, model: str, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict:
    """One streamed piece; `text` None with no finish_reason is the usage-only last chunk."""
    if chat:
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
