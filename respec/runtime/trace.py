"""The run's trace: every envelope sent or received, crashes and rejected frames.

Each process appends length-prefixed MessagePack records to `runs/<name>/trace.<group>.msgpack`.
Envelopes are stored as the raw bytes that went over the wire (no re-encoding); bodies
only when the run asks for payloads. A process killed mid-write leaves at most one
partial record at the end, which the reader skips.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from respec.messages import Envelope
from respec.messages.codec import split_header

_LENGTH = struct.Struct("<I")
NIL = msgspec.Raw(b"\xc0")


class TraceRecord(msgspec.Struct, array_like=True):
    event: str  # send, recv, reject, crash, restart, gave_up, start, stop
    t: float  # wall clock of the event
    actor: str  # the instance where it happened, "<actor>/<replica>"
    # msgspec cannot decode `Raw | None`, so "absent" is a Raw MessagePack nil (see has_raw);
    # an empty Raw would encode as nothing at all and shift the fields after it.
    envelope: msgspec.Raw = NIL  # the wire envelope, when a message is involved
    handled_s: float = 0.0  # recv: time the handler took
    detail: str = ""  # crash/reject: what went wrong
    payload: msgspec.Raw = NIL  # the wire body, when payload tracing is on


class TraceWriter:
    """Buffered appender; `flush` is called by the process's periodic tick and at stop."""

    def __init__(self, path: Path, payload: bool = False, enabled: bool = True) -> None:
        self.path = path
        self.payload = payload
        self.enabled = enabled
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer: list[bytes] = []
        self._file = open(path, "ab") if enabled else None  # noqa: SIM115 - closed in close()

    def message(self, event: str, actor: str, frames, handled_s: float = 0.0) -> None:
        """Record a message event from its wire frames [envelope, body, arrays...]."""
        if not self.enabled:
            return
        envelope, body = split_header(frames[0])
        body = msgspec.Raw(bytes(body)) if self.payload else NIL
        self._append(TraceRecord(event, time.time(), actor, msgspec.Raw(bytes(envelope)), handled_s, "", body))

    def event(self, event: str, actor: str, detail: str = "", envelope: bytes | None = None) -> None:
        if not self.enabled:
            return
        raw = msgspec.Raw(envelope) if envelope else NIL
        self._append(TraceRecord(event, time.time(), actor, raw, 0.0, detail))
        self.flush()  # rare events are written at once: they matter most after a crash

    def _append(self, record: TraceRecord) -> None:
        data = self._encoder.encode(record)
        self._buffer.append(_LENGTH.pack(len(data)) + data)
        if len(self._buffer) >= 512:
            self.flush()

    def flush(self) -> None:
        if self._file is not None and self._buffer:
            self._file.write(b"".join(self._buffer))
            self._file.flush()
            self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


_record_decoder = msgspec.msgpack.Decoder(TraceRecord)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def read_trace_file(path: Path) -> Iterator[TraceRecord]:
    data = path.read_bytes()
    offset = 0
    while offset + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        start = offset + _LENGTH.size
        if start + length > len(data):
            break  # a partial last record: the process was killed mid-write
        yield _record_decoder.decode(data[start : start + length])
        offset = start + length


def read_trace(run_dir: Path) -> list[TraceRecord]:
    """All records of a run, every process's file merged, in time order."""
    records = [r for path in sorted(run_dir.glob("trace.*.msgpack")) for r in read_trace_file(path)]
    records.sort(key=lambda record: record.t)
    return records


def has_raw(raw: msgspec.Raw) -> bool:
    """An absent Raw field reads back as empty or as MessagePack nil."""
    return len(raw) > 0 and bytes(raw) != b"\xc0"


def envelope_of(record: TraceRecord) -> Envelope | None:
    return _envelope_decoder.decode(record.envelope) if has_raw(record.envelope) else None
