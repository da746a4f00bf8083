"""ZeroMQ sockets set up in one place, and the two primitives on them: send with
back-pressure and receive in batches.

Sends try a non-blocking send first; only when the high-water mark is reached do they
await the socket becoming writable, so a full queue slows the sender down and nothing is
dropped. PUB sockets are XPUB with XPUB_NODROP for the same reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

RECV_BATCH = 256  # messages drained per wake-up before yielding to other tasks


class Port:
    """An asyncio socket with a synchronous shadow for the non-blocking fast path."""

    def __init__(self, context: zmq.asyncio.Context, kind: int, hwm: int, name: str) -> None:
        self.name = name
        self.socket = context.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        if kind == zmq.XPUB:
            self.socket.setsockopt(zmq.XPUB_NODROP, 1)  # block, never drop, when a peer is full
            self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription (start barrier)
        self.fast = zmq.Socket.shadow(self.socket.underlying)

    def bind(self, *endpoints: str) -> None:
        for endpoint in endpoints:
            self.socket.bind(endpoint)

    def connect(self, *endpoints: str) -> None:
        for endpoint in endpoints:
            self.socket.connect(endpoint)

    async def send(self, frames: list[Any]) -> None:
        try:
            self.fast.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # high-water mark reached: wait for room (back-pressure)
            await self.socket.send_multipart(frames, copy=False)

    async def receive_forever(self, deliver: Callable[[list[Any]], Awaitable[None]]) -> None:
        """Await one message, then drain what else is queued, handing each to `deliver`."""
        while True:
            await deliver(await self.socket.recv_multipart(copy=False))
            for _ in range(RECV_BATCH):
                try:
                    frames = self.fast.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                await deliver(frames)

    def close(self) -> None:
        self.socket.close(linger=0)
