"""The HTTP routes: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, plus
`/health` (the engine's rows and counters: what a test or an operator checks)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from respec.serve.protocol import ChatRequest, CompletionRequest, OpenAIError, validation_message
from respec.serve.service import CompletionService, Job, Run


def build_api(service: CompletionService) -> FastAPI:
    api = FastAPI(title="respec", docs_url=None, redoc_url=None)

    @api.exception_handler(OpenAIError)
    async def openai_error(_: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @api.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 with its own body; OpenAI clients expect 400 and {"error": ...}
        message, param = validation_message(error.errors())
        return JSONResponse(OpenAIError(message, param=param).body(), status_code=400)

    @api.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await _respond(service, service.completion_job(request))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        return await _respond(service, service.chat_job(request))

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "respec",
                                            "created": 0, "max_model_len": service.context_length}]}

    @api.get("/health")
    async def health() -> dict:
        return service.health()

    return api


async def _respond(service: CompletionService, job: Job):
    run = await service.start(job)  # refusals by the engine are still a plain 4xx here
    if job.stream:
        return _EngineStream(service, run)
    return JSONResponse(await service.complete(run))


class _EngineStream(StreamingResponse):
    """An SSE stream that frees its row however the response ends. The generator frees it
    when it runs to its end or is cancelled mid-stream; a client that leaves before the
    first chunk is sent cancels the response before the generator ever starts, and a
    generator never started runs no cleanup, hence the `finally` here as well."""

    def __init__(self, service: CompletionService, run: Run) -> None:
        super().__init__(service.events(run), media_type="text/event-stream")
        self._free = lambda: service.engine.cancel(run.submission)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._free()  # a no-op when the output already ended
