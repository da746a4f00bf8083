"""Workers for the demo graph: raise each Tick's payload to a power.

Two classes with the same messages, so a run file can swap one for the other
(configs/demo_swap.yaml names Cuber where configs/demo.yaml names Squarer).
"""

from __future__ import annotations

from respec.messages import Envelope, Tick, Worked
from respec.runtime import Actor, handles


class Squarer(Actor):
    sends = (Worked,)
    power = 2

    @handles(Tick)
    async def on_tick(self, tick: Tick, envelope: Envelope) -> None:
        result = tick.payload**self.power if tick.payload is not None else None
        await self.send(Worked(seq=tick.seq, worker=self.name, result=result),
                        correlation_id=envelope.correlation_id)


class Cuber(Squarer):
    power = 3
