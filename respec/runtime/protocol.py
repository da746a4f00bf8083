"""The control link between the launcher and its process groups (not actor messages)."""

from __future__ import annotations

from typing import Any

import msgspec


class GroupEvent(msgspec.Struct, frozen=True):
    """Group -> launcher. kind: ready, stats, metrics, progress, crash, gave_up, finish,
    message (a CONTROL-channel message from an actor), failed, stopped."""

    kind: str
    group: str
    actor: str = ""
    data: dict[str, Any] = {}


class LauncherCommand(msgspec.Struct, frozen=True):
    """Launcher -> group. kind: start, stop, peer_restarted (reason: the group that died and
    was started again)."""

    kind: str
    reason: str = ""


encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(GroupEvent)
command_decoder = msgspec.msgpack.Decoder(LauncherCommand)
