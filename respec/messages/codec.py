"""Encoding messages to ZeroMQ frames and back, with validation on the way in.

Wire layout of one message: [header, array frame 0, array frame 1, ...], where the header
is `<u32 envelope length><envelope><body>`, both MessagePack, and arrays are raw bytes (see
arrays.py). Envelope and body share one frame because every ZeroMQ frame costs several
microseconds to send and receive in Python; the length prefix still lets routing and
tracing read the envelope without touching the body.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from typing import Any

import msgspec

from respec.messages.arrays import ArrayPacker, ArrayUnpacker
from respec.messages.base import Message, message_type
from respec.messages.envelope import SCHEMA_VERSION, Envelope


class FrameError(ValueError):
    """A frame set that cannot be decoded; the message says what was wrong."""


_PREFIX = struct.Struct("<I")
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


class _BodyEncoders(threading.local):
    """One cached encoder per thread; its array packer is reset for every message."""

    def __init__(self) -> None:
        self.packer = ArrayPacker(False)
        self.encoder = msgspec.msgpack.Encoder(enc_hook=self.packer.enc_hook)

    def get(self, allow_device_refs: bool, use_shared_memory: bool):
        self.packer.reset(allow_device_refs, use_shared_memory)
        return self.packer, self.encoder


_body_encoders = _BodyEncoders()


def encode(envelope: Envelope, body: Message, allow_device_refs: bool = False,
           use_shared_memory: bool = False) -> list[Any]:
    """Frames for one message; arrays become zero-copy frames after the two headers.

    allow_device_refs: every receiver shares this process (device tensors by reference).
    use_shared_memory: one receiver, on this host (large arrays through shared memory).
    """
    packer, encoder = _body_encoders.get(allow_device_refs, use_shared_memory)
    body_bytes = encoder.encode(body)
    envelope_bytes = _envelope_encoder.encode(envelope)
    header = b"".join((_PREFIX.pack(len(envelope_bytes)), envelope_bytes, body_bytes))
    return [header, *packer.frames]


def split_header(frame: Any) -> tuple[memoryview, memoryview]:
    """(envelope bytes, body bytes) of a header frame, without copies."""
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    if len(view) < _PREFIX.size:
        raise FrameError(f"header frame of {len(view)} bytes is too short")
    (length,) = _PREFIX.unpack_from(view)
    if _PREFIX.size + length > len(view):
        raise FrameError(f"header says the envelope has {length} bytes; the frame has {len(view)}")
    return view[_PREFIX.size : _PREFIX.size + length], view[_PREFIX.size + length :]


def decode_envelope(frame: Any) -> Envelope:
    """The envelope alone (what routing and tracing need), validated."""
    envelope_bytes, _ = split_header(frame)
    try:
        envelope = _envelope_decoder.decode(envelope_bytes)
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
    _, body_bytes = split_header(frames[0])
    try:
        kind = message_type(envelope.type)
    except ValueError as error:
        raise FrameError(f"message {envelope.id}: {error}") from None
    decoder = _body_decoders.get(kind, [_buffer(frame) for frame in frames[1:]])
    try:
        return decoder.decode(body_bytes)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as error:
        raise FrameError(f"message {envelope.id} ({envelope.type}) has a bad body: {error}") from None


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode(frames: Sequence[Any]) -> tuple[Envelope, Message]:
    if not frames:
        raise FrameError("empty message: no frames")
    envelope = decode_envelope(frames[0])
    return envelope, decode_body(envelope, frames)
