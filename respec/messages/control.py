"""Messages between actors and the runtime: metrics, errors and run control."""

from __future__ import annotations

from respec.messages.base import Channel, Message


class Control(Message, frozen=True):
    """A run-wide command: "pause", "resume" or "finish" (with the reason)."""

    channel = Channel.BROADCAST
    command: str
    reason: str = ""


class Metrics(Message, frozen=True):
    """Numbers an actor reports; the runtime appends RL steps to metrics.jsonl."""

    channel = Channel.CONTROL
    source: str  # actor instance
    step: int  # the actor's step counter (RL step for the trainer)
    values: dict[str, float]


class ErrorReport(Message, frozen=True):
    """An actor crashed, a frame was rejected, or an actor gave up."""

    channel = Channel.CONTROL
    actor: str  # actor instance, "<name>/<replica>"
    kind: str  # "crash", "bad_frame", "gave_up"
    error: str  # exception type and message
    message_id: str = ""  # the message being handled when it happened
    restarts: int = 0  # restarts so far
    traceback: str = ""
