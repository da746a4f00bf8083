"""Encoding messages to ZeroMQ frames and back, with validation on the way in.

Wire layout of one message: [envelope, body, array frame 0, array frame 1, ...].
The envelope and the body are MessagePack; arrays are raw bytes (see arrays.py).
"""

from __future__ import annotations

from collections.abc import Sequence
import threading
from typing import Any

import msgspec

from respec.messages.arrays import ArrayPacker, ArrayUnpacker
from respec.messages.base import Message, message_type
from respec.messages.envelope import SCHEMA_VERSION, Envelope


class FrameError(ValueError):
    """A frame set that cannot be decoded; the message says what was wrong."""


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


class _BodyDecoders(threading.local):
    """One cached decoder per message type and thread; arrays come from `unpacker.frames`."""

    def __init__(self) -> None:
        self.unpacker = ArrayUnpacker([])
        self.by_type: dict[type[Message], msgspec.msgpack.Decoder] = {}

    def get(self, kind: type[Message], frames: list[Any]) -> msgspec.msgpack.Decoder:
        self.unpacker.frames = frames
        decoder = self.by_type.get(kind)
        if decoder is None:
            decoder = msgspec.msgpack.Decoder(kind, dec_hook=self.unpacker.dec_hook)
            self.by_type[kind] = decoder
        return decoder


_body_decoders = _BodyDecoders()


def encode(envelope: Envelope, body: Message, allow_device_refs: bool = False) -> list[Any]:
    """Frames for one message; arrays become zero-copy frames after the two headers."""
    packer = ArrayPacker(allow_device_refs)
    body_bytes = msgspec.msgpack.Encoder(enc_hook=packer.enc_hook).encode(body)
    return [_envelope_encoder.encode(envelope), body_bytes, *packer.frames]


def decode_envelope(frame: Any) -> Envelope:
    """The envelope alone (what routing and tracing need), validated."""
    try:
        envelope = _envelope_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise FrameError(f"bad envelope: {error}") from None
    if envelope.schema != SCHEMA_VERSION:
        raise FrameError(
            f"message {envelope.id} has schema version {envelope.schema}; "
            f"this receiver speaks version {SCHEMA_VERSION}"
        )
    return envelope


def decode_body(envelope: Envelope, frames: Sequence[Any]) -> Message:
    """The typed body of a message whose envelope was already decoded."""
    if len(frames) < 2:
        raise FrameError(f"message {envelope.id} has {len(frames)} frames; at least 2 expected")
    try:
        kind = message_type(envelope.type)
    except ValueError as error:
        raise FrameError(f"message {envelope.id}: {error}") from None
    decoder = _body_decoders.get(kind, list(frames[2:]))
    try:
        return decoder.decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as error:
        raise FrameError(f"message {envelope.id} ({envelope.type}) has a bad body: {error}") from None


def decode(frames: Sequence[Any]) -> tuple[Envelope, Message]:
    if not frames:
        raise FrameError("empty message: no frames")
    envelope = decode_envelope(frames[0])
    return envelope, decode_body(envelope, frames)
