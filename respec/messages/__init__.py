"""Typed messages of the respec actor graph and their wire codec."""

from respec.messages.arrays import Array
from respec.messages.base import MESSAGE_TYPES, Channel, Message, message_type
from respec.messages.codec import FrameError, decode, decode_body, decode_envelope, encode
from respec.messages.control import Control, ErrorReport, Metrics
from respec.messages.demo import Ping, Pong, Tick, Worked
from respec.messages.envelope import SCHEMA_VERSION, Envelope
from respec.messages.generation import (
    GenerationStats,
    Prompt,
    Rollout,
    SamplingParams,
    SchedulerDecision,
    VerifyRequest,
    VerifyResult,
)
from respec.messages.training import (
    CapturedTargets,
    DistillSample,
    DraftWeights,
    PolicyWeights,
    ScoredRollout,
    WeightsHandle,
)

__all__ = [
    "MESSAGE_TYPES", "SCHEMA_VERSION", "Array", "CapturedTargets", "Channel", "Control", "DistillSample",
    "DraftWeights", "Envelope", "ErrorReport", "FrameError", "GenerationStats", "Message",
    "Metrics", "Ping", "PolicyWeights", "Pong", "Prompt", "Rollout", "SamplingParams",
    "SchedulerDecision", "ScoredRollout", "Worked", "Tick", "VerifyRequest", "VerifyResult",
    "WeightsHandle", "decode", "decode_body", "decode_envelope", "encode", "message_type",
]
