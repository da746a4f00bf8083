"""The HTTP routes: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, plus
`/health` (the engine's rows and counters: what a test or an operator checks)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from respec.serve.protocol import ChatRequest, CompletionRequest, OpenAIError, validation_message
from respec.serve.service import CompletionService, Job


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
        # closing the stream (a client that left) closes the generator, which frees the row
        return StreamingResponse(service.events(run), media_type="text/event-stream")
    return JSONResponse(await service.complete(run))
