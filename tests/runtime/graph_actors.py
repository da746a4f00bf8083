"""Actors used only by the runtime tests (imported by path from the run files the tests write)."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np

from respec.messages import Envelope, Ping, PolicyWeights, Pong, Tick, WeightsHandle, Worked, encode
from respec.runtime import Actor, RemoteError, handles


class NumberedSender(Actor):
    """Sends `count` Ticks numbered per replica, as fast as back-pressure allows."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 1000

    sends = (Tick,)

    async def run(self) -> None:
        for seq in range(self.params.count):
            await self.send(Tick(seq=seq), correlation_id=self.name)


class SlowOrderedReceiver(Actor):
    """Checks exactly-once, in-order delivery per sender; pauses now and then (slow consumer)."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        expected: int = 1000
        pause_every: int = 10_000
        pause_s: float = 0.05

    async def on_start(self) -> None:
        self.next_seq: dict[str, int] = {}
        self.count = 0

    @handles(Tick)
    async def on_tick(self, tick: Tick, envelope: Envelope) -> None:
        want = self.next_seq.get(envelope.sender, 0)
        if tick.seq != want:
            raise AssertionError(f"{envelope.sender}: got seq {tick.seq}, expected {want}")
        self.next_seq[envelope.sender] = want + 1
        self.count += 1
        if self.count % self.params.pause_every == 0:
            await asyncio.sleep(self.params.pause_s)  # a slow consumer: senders must wait
        if self.count == self.params.expected:
            self.report(0, received=float(self.count), senders=float(len(self.next_seq)))
            self.finish_run("all received in order")


class CrashOnce(Actor):
    """Raises on the Tick with seq `crash_on` the first time the process sees it, then counts."""

    crashed: set[int] = set()  # class-level: survives the restart, so it crashes only once

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        crash_on: int = 5
        expected: int = 20
        always: bool = False  # crash on every Tick (to exhaust the restart policy)

    async def on_start(self) -> None:
        self.count = 0

    @handles(Tick)
    async def on_tick(self, tick: Tick, envelope: Envelope) -> None:
        if self.params.always or (tick.seq == self.params.crash_on and tick.seq not in CrashOnce.crashed):
            CrashOnce.crashed.add(tick.seq)
            raise ZeroDivisionError(f"deliberate crash on tick {tick.seq}")
        self.count += 1
        if tick.seq == self.params.expected - 1:  # the last one; the crashed one is not redelivered
            self.report(0, handled_after_restart=float(self.count))
            self.finish_run("survived a crash")


class FailingEcho(Actor):
    """Answers Pings, but raises on odd ones: the requester must get a RemoteError."""

    @handles(Ping)
    async def on_ping(self, ping: Ping, envelope: Envelope) -> Pong:
        if ping.seq % 2:
            raise ValueError(f"odd ping {ping.seq}")
        return Pong(seq=ping.seq, payload=ping.payload)


class RemoteErrorProbe(Actor):
    sends = (Ping,)

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 6

    async def run(self) -> None:
        ok = errors = 0
        for seq in range(self.params.count):
            payload = np.full(4, seq, dtype=np.int64)
            try:
                pong = await self.request(Ping(seq=seq, payload=payload), timeout_s=10)
                assert pong.seq == seq and np.array_equal(pong.payload, payload)
                ok += 1
            except RemoteError:
                errors += 1
        self.report(0, ok=float(ok), errors=float(errors))
        self.finish_run("probed")




class Sink(Actor):
    """Accepts Worked results and counts them; finishes after `expected`."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        expected: int = 1

    async def on_start(self) -> None:
        self.count = 0

    @handles(Worked)
    async def on_worked(self, worked: Worked, envelope: Envelope) -> None:
        self.count += 1
        if self.count == self.params.expected:
            self.finish_run("sink full")


class NotAnActor:
    """A class that is not an Actor (for the bad-YAML tests)."""


class WeightsPublisher(Actor):
    """Publishes `count` PolicyWeights versions (a broadcast every subscriber must see)."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 50

    sends = (PolicyWeights,)

    async def run(self) -> None:
        for version in range(self.params.count):
            tensors = {"w": np.full(3, version, dtype=np.float32)}
            await self.send(PolicyWeights(version=version, handle=WeightsHandle(kind="local", tensors=tensors)),
                            policy_version=version)


class WeightsSubscriber(Actor):
    """Checks every version arrives once, in order; tells the Sink when it has them all."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        count: int = 50

    sends = (Worked,)

    async def on_start(self) -> None:
        self.next_version = 0

    @handles(PolicyWeights)
    async def on_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        assert weights.version == self.next_version, (weights.version, self.next_version)
        assert float(weights.handle.tensors["w"][0]) == weights.version
        self.next_version += 1
        if self.next_version == self.params.count:
            await self.send(Worked(seq=self.next_version, worker=self.name))


class GarbageSender(Actor):
    """Pushes malformed frames straight onto the receiver's queue, then valid Ticks."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        valid: int = 10

    sends = (Tick,)

    async def run(self) -> None:
        port = self.context.push["receiver"]  # test-only: bypass the codec to send garbage
        good = encode(self.context.envelope(Tick(seq=0)), Tick(seq=0))[0]
        with_array = Tick(seq=0, payload=np.ones(3))
        header_only = encode(self.context.envelope(with_array), with_array)[0]
        wrong_type = msgspec.msgpack.encode({"type": "Tick", "seq": "zero"})
        envelope = msgspec.msgpack.encode(self.context.envelope(Tick(seq=0)))
        for frames in ([b"garbage"], [b""], [good[:9]], [header_only],
                       [len(envelope).to_bytes(4, "little") + envelope + wrong_type]):
            await port.send(frames)
        for seq in range(self.params.valid):
            await self.send(Tick(seq=seq))


class TickCounter(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        expected: int = 10

    async def on_start(self) -> None:
        self.count = 0

    @handles(Tick)
    async def on_tick(self, tick: Tick, envelope: Envelope) -> None:
        self.count += 1
        if self.count == self.params.expected:
            self.report(0, ticks=float(self.count))
            self.finish_run("counted")


class OptionalSender(NumberedSender):
    """Sends Ticks to whoever handles them, and Worked only if someone in the graph does."""

    optional_sends = (Worked,)

    async def run(self) -> None:
        for seq in range(self.params.count):
            await self.send(Worked(seq=seq, worker=self.name))  # nobody handles it here: skipped
            await self.send(Tick(seq=seq))


class ThreadsReporter(Actor):
    async def run(self) -> None:
        import os

        self.report(0, omp_threads=float(os.environ.get("OMP_NUM_THREADS", "0")))
        self.finish_run("reported")
