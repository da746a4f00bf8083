"""Echo and Pinger: request/reply pair for round-trip latency (respec bench runtime)."""

from __future__ import annotations

import time

import msgspec
import numpy as np

from respec.messages import Envelope, Ping, Pong
from respec.runtime import Actor, handles


class Echo(Actor):
    @handles(Ping)
    async def on_ping(self, ping: Ping, envelope: Envelope) -> Pong:
        return Pong(seq=ping.seq, payload=ping.payload)


class Pinger(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 2000
        warmup: int = 200

    sends = (Ping,)

    async def run(self) -> None:
        rtts = []
        for seq in range(self.params.warmup + self.params.count):
            started = time.perf_counter()
            pong = await self.request(Ping(seq=seq))
            if pong.seq != seq:
                raise RuntimeError(f"reply {pong.seq} answers request {seq}")
            if seq >= self.params.warmup:
                rtts.append(time.perf_counter() - started)
        micros = np.array(rtts) * 1e6
        self.report(0, rtt_p50_us=float(np.percentile(micros, 50)), rtt_p99_us=float(np.percentile(micros, 99)))
        self.finish_run(f"{self.params.count} round trips")
