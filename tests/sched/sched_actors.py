"""Actors for the Scheduler graph tests: scripted GenerationStats in, decisions out."""

from __future__ import annotations

import asyncio
import json

import msgspec

from respec.messages import Envelope, GenerationStats, SchedulerDecision
from respec.runtime import Actor, handles


class ScriptedStats(Actor):
    """Sends the GenerationStats listed in a JSON file (dicts of its fields), one by one."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        stats_file: str
        gap_s: float = 0.01  # between messages, so decisions follow the order they were made in

    sends = (GenerationStats,)

    async def run(self) -> None:
        for fields in json.loads(open(self.params.stats_file).read()):
            await self.send(GenerationStats(**fields))
            await asyncio.sleep(self.params.gap_s)
        await asyncio.Event().wait()


class DecisionFile(Actor):
    """Writes every SchedulerDecision to a JSON file; ends the run after `expected`."""

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        out_file: str
        expected: int

    async def on_start(self) -> None:
        self.decisions: list[dict] = []

    @handles(SchedulerDecision)
    async def on_decision(self, decision: SchedulerDecision, envelope: Envelope) -> None:
        self.decisions.append(msgspec.to_builtins(decision))
        if len(self.decisions) == self.params.expected:
            with open(self.params.out_file, "w") as stream:
                json.dump(self.decisions, stream)
            self.finish_run("all decisions")
