"""Actors for throughput and large-array measurements (respec bench runtime)."""

from __future__ import annotations

import time

import msgspec
import numpy as np

from respec.messages import Envelope, Tick
from respec.runtime import Actor, handles


class RateCollector(Actor):
    """Counts Ticks; reports messages per second between the first and the last."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        expected: int = 100_000

    async def on_start(self) -> None:
        self.count = 0
        self.first = 0.0

    @handles(Tick)
    async def on_tick(self, tick: Tick, envelope: Envelope) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
        elif self.count == self.params.expected:
            rate = (self.count - 1) / (time.perf_counter() - self.first)
            self.report(0, msgs_per_s=rate)
            self.finish_run(f"{self.count} messages")


class ArraySender(Actor):
    """Sends `count` large float32 arrays, one at a time (each waits for the last to land)."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 5
        megabytes: int = 64

    sends = (Tick,)

    async def run(self) -> None:
        array = np.ones(self.params.megabytes * 2**20 // 4, dtype=np.float32)
        for seq in range(self.params.count):
            await self.send(Tick(seq=seq, payload=array))
            await _sleep(0.3)  # let the receiver finish: we time transfers, not queueing


class ArrayReceiver(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        expected: int = 5
        megabytes: int = 64

    async def on_start(self) -> None:
        self.times: list[float] = []

    @handles(Tick)
    async def on_tick(self, tick: Tick, envelope: Envelope) -> None:
        self.times.append((time.time() - envelope.sent_at) * 1e3)
        if tick.payload.nbytes != self.params.megabytes * 2**20:
            raise ValueError(f"array of {tick.payload.nbytes} bytes arrived")
        if len(self.times) == self.params.expected:
            self.report(0, transfer_ms_median=float(np.median(self.times)))
            self.finish_run("arrays received")


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
