"""The serving engine in this process (no Ray, no HTTP): the Scheduler's rule picking shapes
keeps greedy output exact, requests beyond the free rows wait, a waiting request that is
cancelled never runs, an engine fault ends every request in flight instead of hanging it."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from respec.cli import app
from respec.serve.build import ServeOptions, build_service
from respec.serve.protocol import CompletionRequest, OpenAIError
from respec.serve.shape import ScheduledShape
from tests.serve.conftest import MAX_LEN

PROMPTS = ["1+2=", "33*4=", "7-1+6=", "(2+3)*4=", "9/3="]



def service_for(served_dirs, draft: bool, **options):
    policy, eagle = served_dirs
    return build_service(ServeOptions(str(policy), str(eagle) if draft else "", max_len=MAX_LEN, threads=1,
                                      **options))


async def complete(service, prompt: str, max_tokens: int = 30) -> dict:
    job = service.completion_job(CompletionRequest(prompt=prompt, max_tokens=max_tokens, temperature=0))
    return await service.complete(await service.start(job))


async def complete_all(service, prompts: list[str], max_tokens: int = 30) -> list[dict]:
    return await asyncio.gather(*(complete(service, p, max_tokens) for p in prompts))


def texts(results: list[dict]) -> list[str]:
    return [r["choices"][0]["text"] for r in results]


def test_the_schedulers_rule_keeps_greedy_output_exact(served_dirs, one_thread):
    plain = service_for(served_dirs, draft=False, max_rows=2)
    scheduled = service_for(served_dirs, draft=True, max_rows=2, shape="auto")
    expected = texts(asyncio.run(complete_all(plain, PROMPTS)))
    results = asyncio.run(complete_all(scheduled, PROMPTS))
    assert texts(results) == expected
    assert isinstance(scheduled.engine.chooser, ScheduledShape) and scheduled.engine.chooser.policy.decisions > 0
    shapes = {s for r in results for s in r["respec"]["draft_shapes"]}
    assert shapes - {"nosd"}, shapes  # it did speculate (it explores the shapes first)
    health = scheduled.health()
    assert health["admitted"] == health["finished"] == len(PROMPTS) and health["free_rows"] == 2


def test_a_cancelled_waiting_request_never_runs(served_dirs, one_thread):
    service = service_for(served_dirs, draft=False, max_rows=1)

    async def scenario():
        running = asyncio.create_task(complete(service, PROMPTS[0]))
        await asyncio.sleep(0)  # the first request takes the only row
        job = service.completion_job(CompletionRequest(prompt=PROMPTS[1], max_tokens=30, temperature=0))
        waiting = asyncio.create_task(service.start(job))
        await asyncio.sleep(0.01)
        assert service.health()["waiting"] == 1
        waiting.cancel()  # its client went away before it got a row
        return await running

    assert asyncio.run(scenario())["choices"][0]["finish_reason"] == "length"
    health = service.health()
    assert [health[k] for k in ("admitted", "finished", "waiting", "aborted", "free_rows")] == [1, 1, 0, 0, 1]


def test_an_engine_fault_ends_the_requests_in_flight_and_frees_their_rows(served_dirs, one_thread, monkeypatch):
    service = service_for(served_dirs, draft=False, max_rows=2)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(service.engine.engine.target, "verify", broken)

    async def scenario():
        return await asyncio.gather(*(complete(service, p) for p in PROMPTS[:2]), return_exceptions=True)

    errors = asyncio.run(scenario())
    assert all(isinstance(e, OpenAIError) and e.status == 500 and "device lost" in e.message for e in errors)
    assert service.health()["free_rows"] == 2 and service.health()["active_rows"] == 0


@pytest.mark.parametrize("arguments, message", [
    (["--shape", "s9"], "s<steps>_t<branch>_n<num_draft>"),
    (["--shape", "s4_t1_n4"], "needs a drafter"),
    (["--draft", "/nonexistent"], "not a directory"),
    (["--max-len", "99999"], "max_position_embeddings"),
])
def test_serve_refuses_bad_options_before_starting_ray(served_dirs, arguments, message):
    result = CliRunner().invoke(app, ["serve", str(served_dirs[0]), *arguments])
    assert result.exit_code == 2 and message in result.output, result.output


def test_chat_messages_go_through_the_checkpoints_chat_template(served_dirs, tmp_path):
    import json
    import shutil

    from respec.serve.protocol import ChatRequest

    policy = shutil.copytree(served_dirs[0], tmp_path / "templated")
    config = json.loads((policy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}A:"
    (policy / "tokenizer_config.json").write_text(json.dumps(config))
    service = build_service(ServeOptions(str(policy), max_len=MAX_LEN, threads=1))
    job = service.chat_job(ChatRequest(messages=[{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "2+2="}]))
    assert job.prompt == service.tokenizer.encode("<system>be brief<user>2+2=A:")  # the template's own text, no <bos> added
