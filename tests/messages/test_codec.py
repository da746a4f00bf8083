"""Every message type round-trips bit-exactly; bad frames give clear errors."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    CapturedTargets,
    Control,
    DistillSample,
    DraftWeights,
    Envelope,
    ErrorReport,
    FrameError,
    GenerationStats,
    Metrics,
    Ping,
    PolicyWeights,
    Pong,
    Prompt,
    Rollout,
    SamplingParams,
    SchedulerDecision,
    ScoredRollout,
    Tick,
    VerifyRequest,
    VerifyResult,
    WeightsHandle,
    Worked,
    decode,
    encode,
)
from respec.messages.codec import split_header

rng = np.random.default_rng(0)


def ints(*shape):
    return rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int32)


def floats(*shape):
    return rng.standard_normal(shape).astype(np.float32)


PROMPT = Prompt(prompt_id="g1/0", group_id="g1", sample_index=0, tokens=ints(7),
                sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, stop_token_ids=(2,)),
                task="arithmetic", answer="42", text="6*7=")
ROLLOUT = Rollout(prompt=PROMPT, tokens=ints(5), logprobs=floats(5), token_versions=ints(5),
                  finish_reason="stop", accept_len=2.5, gen_time_s=0.1)

# One instance of every message type, arrays included.
EXAMPLES = [
    PROMPT,
    VerifyRequest(step=3, slots=ints(2), tokens=ints(2, 5), parents=ints(2, 4), num_nodes=ints(2),
                  draft_probs=floats(2, 4, 11), new_rows=[PROMPT], finished_slots=ints(1)),
    VerifyResult(step=3, slots=ints(2), num_accepted=ints(2), tokens=ints(2, 5), logprobs=floats(2, 5),
                 features=torch.randn(2, 5, 8, dtype=torch.bfloat16), target_probs_topk=floats(2, 5, 3),
                 target_ids_topk=ints(2, 5, 3), step_time_s=0.01),
    ROLLOUT,
    GenerationStats(active_rows=4, waiting_prompts=2, config="s3_t1_n3", step_time_s=0.02,
                    tokens_emitted=9, mean_accept_len=2.2, context_len_mean=40.0),
    SchedulerDecision(decision_id=1, speculate=True, steps=3, branch=2, num_draft=6, batch_size=8,
                      predicted_tokens_per_s={"nosd": 10.0, "s3_t2_n6": 20.0}, reason="faster"),
    ScoredRollout(rollout=ROLLOUT, reward=1.0, correct=True),
    DistillSample(prompt_id="g1/0", policy_version=2, tokens=ints(12), response_start=7,
                  features=torch.randn(12, 6), target_probs_topk=floats(12, 4), target_ids_topk=ints(12, 4),
                  reward=1.0, advantage=0.5),
    CapturedTargets(policy_version=3, layers=[0, 1], tokens=torch.arange(10).reshape(2, 5),
                    valid=torch.ones(2, 5, dtype=torch.bool), response_starts=torch.tensor([2, 3]),
                    features=torch.randn(2, 5, 8), logits=torch.randn(2, 5, 7), rewards=floats(2), groups=["g0", "g1"],
                    parts={"model.norm.weight": torch.ones(4)}),
    PolicyWeights(version=4, handle=WeightsHandle(kind="local", tensors={"a": floats(3, 3), "b": torch.arange(4)})),
    DraftWeights(version=2, handle=WeightsHandle(kind="file", location="/tmp/draft.safetensors"),
                 heldout_accept_before=2.0, heldout_accept_after=2.5),
    Control(command="pause", reason="staleness"),
    Metrics(source="trainer/0", step=1, values={"loss": 0.5}),
    ErrorReport(actor="a/0", kind="crash", error="ValueError: x", message_id="b/0#1", restarts=1),
    Tick(seq=1, payload=np.zeros((0, 3), dtype=np.float64)),
    Worked(seq=2, worker="w/0", result=np.array(3.5, dtype=np.float32)),  # 0-d
    Ping(seq=3, payload=np.arange(6, dtype=np.uint8).reshape(2, 3)[:, ::2]),  # non-contiguous
    Pong(seq=3),
]


def envelope_for(body) -> Envelope:
    return Envelope(SCHEMA_VERSION, "a/0#1", type(body).__name__, "a/0", time.time(),
                    policy_version=3, draft_version=2, correlation_id="g1/0")


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.uint8) if b.dtype == torch.bfloat16 else b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit-exact, NaN payloads included
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b)
        for name in a.__struct_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_every_message_type_has_an_example():
    assert {type(e).__name__ for e in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("body", EXAMPLES, ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("shared_memory", [False, True], ids=["frames", "shm"])
def test_round_trip_is_bit_exact(body, shared_memory, monkeypatch):
    from respec.messages import shared_memory as shm

    monkeypatch.setattr(shm, "MIN_BYTES", 1)  # send every array through shared memory
    envelope = envelope_for(body)
    frames = encode(envelope, body, use_shared_memory=shared_memory)
    wire = [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]
    got_envelope, got_body = decode(wire)
    assert got_envelope == envelope
    assert_same(body, got_body)


def test_decoded_arrays_are_views_of_the_frames_not_copies():
    payload = np.arange(1000, dtype=np.float32)
    frames = encode(envelope_for(Tick(seq=0)), Tick(seq=0, payload=payload))
    buffer = bytearray(bytes(memoryview(frames[1]).cast("B")))
    _, tick = decode([frames[0], buffer])
    buffer[:4] = b"\x00\x00\x80\x7f"  # change the frame; the array must see it
    assert np.isinf(tick.payload[0])


def test_shared_memory_segment_is_recycled_after_the_array_dies(monkeypatch):
    from respec.messages import shared_memory as shm

    shm.set_scope("codec-test")
    try:
        array = np.ones(1 << 18, dtype=np.float32)  # 1 MiB
        first = decode(encode(envelope_for(Tick(seq=0)), Tick(seq=0, payload=array), use_shared_memory=True))[1]
        name_of = lambda frames: msgspec.msgpack.decode(split_header(frames[0])[1])["payload"][3]  # noqa: E731
        del first  # the receiver is done with it: the segment goes back to the pool
        frames = encode(envelope_for(Tick(seq=1)), Tick(seq=1, payload=array * 2), use_shared_memory=True)
        second = decode(frames)[1]  # through the mapping kept from the first: must see the new bytes
        assert np.array_equal(second.payload, array * 2)
        assert name_of(frames).startswith("respec-codec-test-busy-")
        del second
        assert shm.remove_scope("codec-test") == 1  # one segment in all: the first was reused
    finally:
        shm.remove_scope("codec-test")


def test_device_tensor_between_processes_is_refused_with_a_clear_error():
    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    tensor = torch.ones(2).as_subclass(FakeCuda)
    with pytest.raises(ValueError, match="cannot be sent to another process"):
        encode(envelope_for(Tick(seq=0)), Tick(seq=0, payload=tensor))
    # inside one process it travels by reference, untouched
    frames = encode(envelope_for(Tick(seq=0)), Tick(seq=0, payload=tensor), allow_device_refs=True)
    assert decode(frames)[1].payload is tensor


def test_a_captured_pass_travels_by_reference_within_a_process():
    """CapturedTargets (PolicyTrainer -> CapturedDistiller): every device tensor, those in
    its `parts` dict too, arrives as the very object sent; across processes it is refused."""
    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    def cuda(*shape):
        return torch.zeros(*shape).as_subclass(FakeCuda)

    body = CapturedTargets(policy_version=3, layers=[0, 1], tokens=cuda(2, 5), valid=cuda(2, 5),
                           response_starts=cuda(2), features=cuda(2, 5, 8), logits=cuda(2, 5, 7),
                           rewards=np.array([1.0, 0.0], np.float32), groups=["g0", "g0"],
                           parts={"lm_head.weight": cuda(7, 4)})
    received = decode(encode(envelope_for(body), body, allow_device_refs=True))[1]
    assert received.features is body.features and received.parts["lm_head.weight"] is body.parts["lm_head.weight"]
    assert received.rewards.tolist() == [1.0, 0.0] and received.groups == ["g0", "g0"]
    with pytest.raises(ValueError, match="cannot be sent to another process"):
        encode(envelope_for(body), body)


DEVICE_REF_FIRST = """
import sys
from respec.messages import SCHEMA_VERSION, CapturedTargets, Envelope, decode, encode
assert "torch" not in sys.modules
import numpy as np
import torch

class FakeCuda(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda", 0)

t = torch.zeros(2, 3).as_subclass(FakeCuda)
body = CapturedTargets(policy_version=0, layers=[0], tokens=t, valid=t, response_starts=t, features=t, logits=t,
                       rewards=np.zeros(2, np.float32), groups=["a", "b"])
envelope = Envelope(schema=SCHEMA_VERSION, id="a/0#1", type="CapturedTargets", sender="a/0", sent_at=0.0)
assert decode(encode(envelope, body, allow_device_refs=True))[1].tokens is t
"""


def test_a_process_whose_first_tensor_is_on_a_gpu_takes_its_own_references():
    """respec.messages imported before torch, the first tensor ever encoded a device one:
    its reference decodes as an Array (an H100 run rejected every CapturedTargets so)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DEVICE_REF_FIRST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --- bad frames -------------------------------------------------------------------------------
def good_frames():
    return encode(envelope_for(EXAMPLES[3]), EXAMPLES[3])


@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
@settings(max_examples=300, deadline=None)
def test_garbage_frames_raise_frame_error_only(frames):
    with pytest.raises(FrameError):
        decode(frames)


@given(st.integers(min_value=0, max_value=400))
@settings(max_examples=100, deadline=None)
def test_truncated_header_is_a_frame_error(cut):
    frames = good_frames()
    header = bytes(frames[0])
    if cut >= len(header):
        cut = len(header) - 1
    with pytest.raises(FrameError):
        decode([header[:cut], *frames[1:]])


def test_errors_name_what_was_wrong():
    header = bytes(good_frames()[0])
    with pytest.raises(FrameError, match="too short"):
        decode([b"\x01"])
    with pytest.raises(FrameError, match="no frames"):
        decode([])
    wrong_type = msgspec.msgpack.encode({"type": "Tick", "seq": "one"})
    envelope = msgspec.msgpack.encode(envelope_for(Tick(seq=1)))
    prefix = len(envelope).to_bytes(4, "little")
    with pytest.raises(FrameError, match=r"bad body: Expected `int`, got `str` - at `\$.seq`"):
        decode([prefix + envelope + wrong_type])
    future = Envelope(SCHEMA_VERSION + 1, "x#1", "Tick", "x", 0.0)
    encoded = msgspec.msgpack.encode(future)
    with pytest.raises(FrameError, match="schema version 2; this receiver speaks version 1"):
        decode([len(encoded).to_bytes(4, "little") + encoded + b"\x80"])
    unknown = Envelope(SCHEMA_VERSION, "x#1", "Nope", "x", 0.0)
    encoded = msgspec.msgpack.encode(unknown)
    with pytest.raises(FrameError, match="unknown message type 'Nope'"):
        decode([len(encoded).to_bytes(4, "little") + encoded + b"\x80"])
    with pytest.raises(FrameError, match="array frame 0 missing"):
        decode([header])  # the Rollout's arrays are not there
