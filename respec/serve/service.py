"""Between the HTTP routes and the engine: prompts in, text and statistics out (no HTTP here).

- Prompts. A completion's text is encoded as respec poses RL prompts (`<bos>` first when
  the tokenizer has one); a list of token ids is taken as given. Chat messages go
  through the tokenizer's chat template (`chat_template` in MODEL_DIR's
  tokenizer_config.json) when it has one; otherwise they are rendered the way respec's
  dataset task renders chat rows without a template (the contents joined by blank lines,
  roles dropped, `<bos>` first), so a policy RL-trained that way is served the same text.
- Context. A request must fit `context_length` = the cache's max_len less the draft room
  of one step (prompt + max_tokens); else 400 `context_length_exceeded`. Without
  max_tokens a chat may use the rest of the context; a completion gets 16 (OpenAI's
  default).
- Usage. completion_tokens counts the tokens generated up to the end of the output: a
  stop string ends it at the token that completed it; a stop id (eos) is counted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from respec.engine.speculative import Sampling
from respec.engine.tokenizer import TextTokenizer
from respec.serve.engine_loop import Progress, ServingEngine, Submission
from respec.serve.protocol import (
    Acceptance,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    chunk,
    new_id,
    refuse_unsupported,
    response,
    usage,
)
from respec.serve.text import TextStream


@dataclass(frozen=True)
class Job:
    """One validated request, ready for the engine."""

    chat: bool
    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    request_id: str


@dataclass
class Run:
    """A job in the engine: its first update (admitted or refused) already received."""

    job: Job
    submission: Submission
    first: Progress
    text: TextStream
    acceptance: Acceptance = field(default_factory=Acceptance)
    completion_tokens: int = 0


class CompletionService:
    def __init__(self, engine: ServingEngine, tokenizer: TextTokenizer, model_name: str, stop_ids: tuple[int, ...],
                 vocab_size: int, has_drafter: bool, chat_template_dir: str | None = None) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.stop_ids, self.vocab_size, self.has_drafter = stop_ids, vocab_size, has_drafter
        self.context_length = engine.engine.target.cache.max_len - engine.chooser.reserve - 1
        self._render = _chat_renderer(chat_template_dir)

    # ------------------------------------------------------------------ requests -> jobs

    def completion_job(self, request: CompletionRequest) -> Job:
        refuse_unsupported(request)
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise OpenAIError(f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        ids = self._encode(prompt, add_bos=True) if isinstance(prompt, str) else self._check_ids(prompt)
        return self._job(False, request, ids, request.max_tokens, "prompt")

    def chat_job(self, request: ChatRequest) -> Job:
        refuse_unsupported(request)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        text, templated = self._render(messages)
        return self._job(True, request, self._encode(text, add_bos=not templated), request.completion_limit, "messages")

    def _job(self, chat: bool, request, ids: list[int], max_tokens: int | None, param: str) -> Job:
        if not ids:
            raise OpenAIError("the prompt is empty", param=param)
        room = self.context_length - len(ids)
        wanted = max_tokens if max_tokens is not None else max(room, 1)
        if len(ids) + wanted > self.context_length:
            raise OpenAIError(f"This model's maximum context length is {self.context_length} tokens. However, you "
                              f"requested {len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} for the "
                              f"completion). Please reduce the prompt or max_tokens.",
                              param=param, code="context_length_exceeded")
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p, max_new_tokens=wanted,
                            stop_token_ids=self.stop_ids)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return Job(chat, ids, sampling, tuple(request.stop or ()), request.stream, include_usage, new_id(chat))

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_bos=add_bos)
        except ValueError as error:
            raise OpenAIError(str(error), param="prompt") from None

    def _check_ids(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise OpenAIError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param="prompt")
        return list(ids)

    # ------------------------------------------------------------------ jobs -> engine

    async def start(self, job: Job) -> Run:
        """Submit and wait until the engine admits the job (a slot may have to free up first)."""
        submission = self.engine.submit(job.prompt, job.sampling)
        try:
            first = await submission.updates.get()
        except BaseException:  # the client left while the request waited
            self.engine.cancel(submission)
            raise
        if first.error:
            raise (OpenAIError(first.error, status=500, kind="server_error") if first.fault
                   else OpenAIError(first.error, code="rejected_by_engine"))
        return Run(job, submission, first, TextStream(self.tokenizer, job.stop))

    async def pieces(self, run: Run) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) until the output ends; the row is freed on exit,
        whether the output ended, a stop string cut it, or the client went away."""
        try:
            progress = run.first
            while True:
                if progress.error:
                    raise OpenAIError(progress.error, status=500, kind="server_error")
                text, finish = self._absorb(run, progress)
                if text or finish:
                    yield text, finish
                if finish:
                    return
                progress = await run.submission.updates.get()
        finally:
            self.engine.cancel(run.submission)

    def _absorb(self, run: Run, progress: Progress) -> tuple[str, str | None]:
        text, used = "", 0
        for token in progress.tokens:  # one at a time: a stop string ends the output at its token
            used += 1
            text += run.text.push([token])
            if run.text.stopped:
                break
        run.completion_tokens += used
        run.acceptance.add(min(progress.accepted, used), progress.steps, progress.config)
        if run.text.stopped:
            return text, "stop"
        if progress.finish_reason:
            return text + run.text.flush(), progress.finish_reason
        return text, None

    # ------------------------------------------------------------------ engine -> bodies

    async def complete(self, run: Run) -> dict:
        text, finish = "", "stop"
        async for piece, reason in self.pieces(run):
            text, finish = text + piece, reason or finish
        return response(run.job.chat, run.job.request_id, self.model_name, text, finish, self._usage(run),
                        self._acceptance(run))

    async def events(self, run: Run) -> AsyncIterator[str]:
        """Server-sent events: chunks, the usage chunk if asked for, then [DONE]."""
        job, first = run.job, True
        async for piece, reason in self.pieces(run):
            body = chunk(job.chat, job.request_id, self.model_name, piece, reason, first)
            if reason and self._acceptance(run):
                body["respec"] = self._acceptance(run).body()  # the finishing chunk carries them
            first = False
            yield _sse(body)
        if job.include_usage:
            body = chunk(job.chat, job.request_id, self.model_name, None, None) | {"usage": self._usage(run)}
            yield _sse(body | {"choices": []})
        yield "data: [DONE]\n\n"

    def _usage(self, run: Run) -> dict:
        return usage(len(run.job.prompt), run.completion_tokens)

    def _acceptance(self, run: Run) -> Acceptance | None:
        return run.acceptance if self.has_drafter else None

    def health(self) -> dict:
        return {"model": self.model_name, "context_length": self.context_length, "drafter": self.has_drafter,
                **self.engine.health()}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _chat_renderer(template_dir: str | None):
    """messages -> (prompt text, whether a chat template rendered it)."""
    from respec.interop.verl_parquet import plain_render, template_render

    if template_dir is None:
        return lambda messages: (plain_render(messages), False)
    render = template_render(template_dir)
    return lambda messages: (render(messages), True)


def has_chat_template(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        return bool(json.loads(path.read_text()).get("chat_template")) if path.is_file() else False
    except json.JSONDecodeError:
        return False
