"""The envelope around every message: what the runtime, the trace and routing need.

It is encoded as its own frame, ahead of the body, so that tracing and routing never
decode (or re-encode) a payload.
"""

from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    """Header of one message on the wire (array-like: compact, order matters)."""

    schema: int  # wire schema version; a receiver rejects one it does not speak
    id: str  # unique message id: "<sender>#<sequence>"
    type: str  # the body's type tag, e.g. "Rollout"
    sender: str  # actor instance that sent it, "<actor>/<replica>"
    sent_at: float  # sender's wall clock (time.time()) at send
    policy_version: int = -1  # policy weights version the payload belongs to (-1: none)
    draft_version: int = -1  # drafter weights version (-1: none)
    correlation_id: str = ""  # the rollout (or request) this message belongs to
    reply_to: str = ""  # for a reply: the id of the request it answers
