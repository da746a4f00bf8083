"""The base of every message: a frozen, tagged msgspec struct with a channel kind.

The channel kind says how a message type moves between actors:
- WORK: a work queue (PUSH/PULL). Every actor *group* that handles the type gets each
  message once; within a group, replicas share the load.
- BROADCAST: PUB/SUB. Every replica of every subscribing group gets each message.
- REQUEST: ROUTER/DEALER. The sender awaits the handler's return value, the reply.
- CONTROL: to the runtime of the sender's process (metrics, error reports).
"""

from __future__ import annotations

import enum
from typing import ClassVar

import msgspec


class Channel(enum.Enum):
    WORK = "work"
    BROADCAST = "broadcast"
    REQUEST = "request"
    CONTROL = "control"  # actor -> runtime (metrics, errors); never routed between actors


MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base class of all messages. Subclasses set `channel` (and `reply` for requests)."""

    channel: ClassVar[Channel] = Channel.WORK
    reply: ClassVar[type[Message] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        tag = cls.__name__  # msgspec's tag for tag=True is the class name
        if tag in MESSAGE_TYPES and MESSAGE_TYPES[tag] is not cls:
            raise TypeError(f"two message types share the tag {tag!r}")
        MESSAGE_TYPES[tag] = cls

    @classmethod
    def type_tag(cls) -> str:
        return cls.__name__


def message_type(tag: str) -> type[Message]:
    try:
        return MESSAGE_TYPES[tag]
    except KeyError:
        raise ValueError(f"unknown message type {tag!r}") from None
