"""The Ray Serve endpoint called with the official openai client: greedy output equals
respec's offline greedy decoding, acceptance statistics with a drafter only, streaming
equals non-streaming, concurrent requests share steps, bad requests get OpenAI-style 4xx,
and a client that leaves mid-stream has its row freed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.engine.tokenizer import load_tokenizer
from tests.serve.conftest import EOS, MAX_LEN, MAX_ROWS

PROMPT = "12+7*3="


@pytest.fixture(scope="module")
def offline(served_dirs):
    """prompt text, max_tokens -> (completion text, token count): respec's greedy decoding
    in this process, no drafter, the same <bos>-first encoding the endpoint uses."""
    policy, _ = served_dirs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model(policy), load_tokenizer(policy)

    def generate(prompt: str, max_tokens: int) -> tuple[str, int]:
        ids = torch.tensor(tokenizer.encode(prompt, add_bos=True))
        engine = SpeculativeEngine(model, None, max_rows=1, max_len=MAX_LEN)
        row = engine.generate([ids], Sampling(temperature=0.0, max_new_tokens=max_tokens, stop_token_ids=(EOS,)))[0]
        return tokenizer.decode(row.tokens), len(row.tokens)

    yield generate
    torch.set_num_threads(threads)


def client(server: str, app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/{app}/v1", api_key="unused", max_retries=0, timeout=60)


def health(server: str, app: str) -> dict:
    return httpx.get(f"{server}/{app}/health", timeout=10).json()


@pytest.mark.parametrize("app", ["plain", "eagle"])
def test_greedy_completion_equals_offline_greedy_decoding(server, offline, app):
    result = client(server, app).completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    text, count = offline(PROMPT, 40)
    assert result.choices[0].text == text and len(text) > 10
    assert result.usage.prompt_tokens == len(PROMPT) + 1  # one id per character, <bos> first
    assert result.usage.completion_tokens == count
    assert result.usage.total_tokens == result.usage.prompt_tokens + count


def test_chat_is_the_plain_rendering_of_the_messages(server, offline):
    # no chat template in the checkpoint: contents joined by blank lines, <bos> first
    messages = [{"role": "system", "content": "1+1"}, {"role": "user", "content": "2*3="}]
    result = client(server, "plain").chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                                              temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == offline("1+1\n\n2*3=", 30)[0]


def test_acceptance_statistics_with_the_drafter_and_absent_without(server):
    speculative = client(server, "eagle").completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                                             temperature=0)
    stats = speculative.model_extra["respec"]
    assert stats["accepted_tokens"] > 0 and stats["verification_steps"] > 0
    assert stats["mean_accepted_per_step"] == pytest.approx(stats["accepted_tokens"] / stats["verification_steps"],
                                                            abs=1e-4)
    assert stats["draft_shapes"] == {"s4_t1_n4": stats["verification_steps"]}
    # every step emits its accepted drafts plus one token; the prefill emits the first
    assert speculative.usage.completion_tokens == 1 + stats["verification_steps"] + stats["accepted_tokens"]
    plain = client(server, "plain").completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    assert "respec" not in (plain.model_extra or {})


def _streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks


def test_streaming_returns_the_non_streaming_text_usage_and_statistics(server):
    eagle = client(server, "eagle")
    whole = eagle.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    text, chunks = _streamed(eagle.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert text == whole.choices[0].text and len(chunks) > 3  # it came in pieces
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [whole.choices[0].finish_reason]
    assert finishing[0].model_extra["respec"] == whole.model_extra["respec"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_streaming_returns_the_non_streaming_message(server):
    plain, messages = client(server, "plain"), [{"role": "user", "content": "9-4="}]
    whole = plain.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    chunks = list(plain.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                                stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert "respec" not in (chunks[-1].model_extra or {})


def test_stop_string_ends_the_output_before_it(server, offline):
    full, _ = offline(PROMPT, 40)
    stop = full[6:8]  # a stop string found mid-output, maybe across steps
    expected = full[: full.index(stop)]
    eagle = client(server, "eagle")
    whole = eagle.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    # counted up to the token completing the stop string (one character per token; special
    # tokens decode to nothing, hence >=)
    assert len(expected) + len(stop) <= whole.usage.completion_tokens < 40
    streamed, _ = _streamed(eagle.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                                     stop=stop, stream=True))
    assert streamed == expected


def test_concurrent_requests_share_verification_steps(server, offline):
    prompts = ["1+2=", "33*4=", "7-1+6=", "(2+3)*4="]
    before = health(server, "plain")["steps"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: client(server, "plain").completions.create(
            model="tiny", prompt=p, max_tokens=60, temperature=0), prompts))
    steps = health(server, "plain")["steps"] - before
    for prompt, result in zip(prompts, results, strict=True):
        assert result.choices[0].text == offline(prompt, 60)[0]
    alone = sum(r.usage.completion_tokens - 1 for r in results)  # plain decoding: one step per later token
    assert steps < alone  # rows were verified together, not one request after another


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    return caught.value


@pytest.mark.parametrize("bad, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"prompt": "€"}, "prompt"),  # not in the character vocabulary
    ({"prompt": [5, 500]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": []}, "prompt"),
])
def test_invalid_values_get_a_400_naming_the_field(server, bad, param):
    arguments = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5} | bad
    error = _error(lambda: client(server, "plain").completions.create(**arguments))
    assert error.body["type"] == "invalid_request_error" and error.body["param"] == param
    assert error.body["message"]


def test_malformed_bodies_get_an_openai_error_body(server):
    url = f"{server}/plain/v1/chat/completions"
    not_json = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    for body in ({"model": "tiny"}, {"model": "tiny", "messages": []},
                 {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}):
        answer = httpx.post(url, json=body, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"]["param"].startswith("messages"), answer.text


def test_a_request_over_the_context_length_gets_a_400(server):
    context = health(server, "plain")["context_length"]
    assert context == MAX_LEN - 1  # no draft room without a drafter
    long_prompt = "1+" * (context // 2)  # context + 1 tokens with <bos>
    for arguments in ({"prompt": long_prompt, "max_tokens": 1}, {"prompt": PROMPT, "max_tokens": context}):
        error = _error(lambda a=arguments: client(server, "plain").completions.create(model="tiny", **a))
        assert error.body["code"] == "context_length_exceeded"
        assert f"maximum context length is {context} tokens" in error.body["message"]
    # with the drafter, a step's draft nodes need room too
    assert health(server, "eagle")["context_length"] == MAX_LEN - 1 - 4


def test_a_client_that_leaves_mid_stream_has_its_row_freed(server):
    before = health(server, "eagle")
    stream = client(server, "eagle").completions.create(model="tiny", prompt=PROMPT, max_tokens=900, temperature=0,
                                                        stream=True)
    for count, _ in enumerate(stream):
        if count == 3:
            break
    assert health(server, "eagle")["active_rows"] == 1  # still generating: 900 tokens take seconds
    stream.close()  # the connection goes away mid-stream
    deadline = time.monotonic() + 10
    while (now := health(server, "eagle"))["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["active_rows"] == 0 and now["free_rows"] == MAX_ROWS
    assert now["aborted"] == before["aborted"] + 1  # freed by the disconnect, not by finishing
    assert now["finished"] == before["finished"]
