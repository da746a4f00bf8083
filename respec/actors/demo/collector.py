"""Collector: the sink of the demo graph. Checks every result and ends the run when all came."""

from __future__ import annotations

import msgspec
import numpy as np

from respec.messages import Envelope, Worked
from respec.runtime import Actor, handles


class Collector(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        expected: int = 1000  # Ticks the source sends
        payload_size: int = 16
        power: int = 2  # what the workers compute (3 with Cuber)

    sends = ()

    async def on_start(self) -> None:
        self.seen: set[int] = set()
        self.per_worker: dict[str, int] = {}

    @handles(Worked)
    async def on_worked(self, worked: Worked, envelope: Envelope) -> None:
        self._check(worked)
        self.seen.add(worked.seq)
        self.per_worker[worked.worker] = self.per_worker.get(worked.worker, 0) + 1
        if len(self.seen) % 100 == 0 or len(self.seen) == self.params.expected:
            self.progress(len(self.seen), self.params.expected, "collected")
        if len(self.seen) == self.params.expected:
            self.report(0, received=float(len(self.seen)), workers=float(len(self.per_worker)))
            self.finish_run(f"collected all {self.params.expected} results")

    def _check(self, worked: Worked) -> None:
        size = self.params.payload_size
        if size:
            want = np.arange(worked.seq, worked.seq + size, dtype=np.float32) ** self.params.power
            if not np.array_equal(worked.result, want):
                raise ValueError(f"seq {worked.seq}: wrong result from {worked.worker}")
