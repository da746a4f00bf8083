"""Ticker: a source that sends `count` Ticks, each carrying a small array."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np

from respec.messages import Tick
from respec.runtime import Actor


class Ticker(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 1000
        payload_size: int = 16  # float32 elements per Tick
        interval_s: float = 0.0  # pause between Ticks (0: as fast as back-pressure allows)

    sends = (Tick,)

    async def run(self) -> None:
        size = self.params.payload_size
        for seq in range(self.params.count):
            payload = np.arange(seq, seq + size, dtype=np.float32) if size else None
            await self.send(Tick(seq=seq, payload=payload), correlation_id=f"tick-{seq}")
            if self.params.interval_s:
                await asyncio.sleep(self.params.interval_s)
            if seq % 100 == 0:
                self.progress(seq, self.params.count, "sent")
        self.progress(self.params.count, self.params.count, "sent")
