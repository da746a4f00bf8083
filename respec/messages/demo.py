"""Small messages for the demo graph, tests and the runtime benchmark."""

from __future__ import annotations

from respec.messages.arrays import Array
from respec.messages.base import Channel, Message


class Tick(Message, frozen=True):
    """A unit of work: a sequence number and, optionally, an array."""

    seq: int
    payload: Array | None = None


class Worked(Message, frozen=True):
    """A worker's answer to a Tick: the payload raised to the worker's power."""

    seq: int
    worker: str
    result: Array | None = None


class Ping(Message, frozen=True):
    """A request that expects a Pong (round-trip latency)."""

    channel = Channel.REQUEST
    seq: int
    payload: Array | None = None


class Pong(Message, frozen=True):
    seq: int
    payload: Array | None = None


Ping.reply = Pong
