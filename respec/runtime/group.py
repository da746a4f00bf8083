"""A process group: the actors of one group in one process, on one asyncio loop.

Start-up is a barrier so that no message is lost: bind every socket, connect to every
peer, wait until each publisher has seen all its subscribers, tell the launcher "ready",
and start the actors only when the launcher says every group is ready.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from respec import log as logging_setup
from respec.messages import FrameError, shared_memory
from respec.runtime import protocol
from respec.runtime.graph import GraphConfig
from respec.runtime.plan import GraphPlan, build_plan
from respec.runtime.supervisor import ActorSupervisor
from respec.runtime.trace import TraceWriter

STATS_PERIOD_S = 0.5
CONTROL_POLL_S = 0.02


class GroupRuntime:
    def __init__(self, plan: GraphPlan, name: str, run_dir: Path, control_endpoint: str,
                 resume: bool = False) -> None:
        self.plan = plan
        self.name = name
        self.run_dir = run_dir
        self.resume = resume  # `respec run --resume`: stateful actors restore their checkpoint
        self.control_endpoint = control_endpoint
        run = plan.config.run
        shared_memory.set_scope(run.name)
        self.trace = TraceWriter(_fresh_trace_path(run_dir, name), run.trace.payload, run.trace.enabled)
        self.log = logging_setup.configure(run_dir / "log.jsonl", console=False, process=name)
        self.zmq = zmq.Context()
        self.control = self.zmq.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.setsockopt(zmq.IDENTITY, name.encode())  # the launcher addresses groups by name
        self.supervisors = [
            ActorSupervisor(instance, actor, self)
            for actor in plan.actors.values()
            if actor.spec.group == name
            for instance in actor.instances()
        ]
        self.parent_pid = os.getppid()

    def endpoints(self, instance: str, kind: str) -> list[str]:
        """Bound endpoints of one socket: inproc for this process, ipc/tcp for the others."""
        external = self.plan.external.get((instance, kind))
        return [self.plan.inproc(instance, kind), *([external] if external else [])]

    # --- events to the launcher -----------------------------------------------------------
    def emit(self, kind: str, actor: str = "", **data: Any) -> None:
        event = protocol.GroupEvent(kind, self.name, actor, data)
        self.control.send(protocol.encoder.encode(event))

    def actor_event(self, kind: str, instance: str, **data: Any) -> None:
        if kind == "message":  # a CONTROL-channel message (metrics, error reports)
            body = data.pop("body")
            data = {"type": type(body).__name__, "body": msgspec.to_builtins(body)}
        self.emit(kind, instance, **data)

    def reject(self, instance: str, frames: list[Any], error: FrameError) -> None:
        """A frame we cannot decode: say what was wrong, keep serving."""
        for supervisor in self.supervisors:
            if supervisor.instance == instance:
                supervisor.rejected += 1
        self.log.error("frame_rejected", actor=instance, error=str(error), frames=len(frames))
        self.trace.event("reject", instance, str(error))
        self.emit("rejected", instance, error=str(error))

    # --- life -----------------------------------------------------------------------------
    async def serve(self) -> None:
        self.control.connect(self.control_endpoint)
        try:
            await self._set_up()
        except Exception as error:  # noqa: BLE001 - tell the launcher, then exit
            self.log.error("group_failed", error=repr(error))
            self.emit("failed", error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(0.2)
            return
        self.emit("ready")
        command = await self._next_command()
        if command.kind == "start":
            for supervisor in self.supervisors:
                await supervisor.start()
            self.trace.event("start", self.name)
            await self._serve_until_stopped()
        await self._shut_down()

    async def _set_up(self) -> None:
        for supervisor in self.supervisors:
            supervisor.bind(self.zmq)
        for supervisor in self.supervisors:
            supervisor.connect(self.zmq)
        timeout = self.plan.config.run.startup_timeout_s
        await asyncio.gather(*(s.wait_for_subscribers(timeout) for s in self.supervisors))

    async def _next_command(self) -> protocol.LauncherCommand:
        while True:
            try:
                return protocol.command_decoder.decode(self.control.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                await asyncio.sleep(CONTROL_POLL_S)
            if os.getppid() != self.parent_pid:  # the launcher died: nobody will say stop
                self.log.error("launcher_gone")
                return protocol.LauncherCommand("stop", "launcher gone")

    async def _serve_until_stopped(self) -> None:
        while True:
            commands = asyncio.create_task(self._next_command())
            while not commands.done():
                await asyncio.wait([commands], timeout=STATS_PERIOD_S)
                self.trace.flush()
                self.emit("stats", data=self._stats())
            command = commands.result()
            if command.kind != "peer_restarted":
                return  # "stop"
            await self._on_peer_restarted(command.reason)

    async def _on_peer_restarted(self, group: str) -> None:
        """Another process group died and was started again: whatever it held (queued
        messages, a KV cache, rows in flight) is gone, and the actors here may need to act."""
        self.log.warning("peer_restarted", group=group)
        self.trace.event("peer_restarted", self.name, group)
        for supervisor in self.supervisors:
            supervisor.context.fail_requests_to(group)
            if supervisor.actor is not None:
                await supervisor.actor.on_peer_restarted(group)

    def _stats(self) -> dict[str, Any]:
        return {
            s.instance: {"handled": s.handled, "sent": s.context.sent, "restarts": s.restarts,
                         "send_waits": s.context.send_waits(), "rejected": s.rejected}
            for s in self.supervisors
        }

    async def _shut_down(self) -> None:
        for supervisor in self.supervisors:
            await supervisor.stop()
        self.trace.event("stop", self.name)
        self.trace.close()
        self.emit("stopped", data=self._stats())
        self.control.close(linger=1000)
        self.zmq.term()


def _fresh_trace_path(run_dir: Path, group: str) -> Path:
    """trace.<group>.msgpack, or trace.<group>.restart<k>.msgpack for a group started again
    after its process died (the dead one's file may end in a half-written record)."""
    path, restart = run_dir / f"trace.{group}.msgpack", 0
    while path.exists():
        restart += 1
        path = run_dir / f"trace.{group}.restart{restart}.msgpack"
    return path


class LaunchFile(msgspec.Struct, frozen=True):
    """What the launcher hands each group process (written once, read by every group)."""

    config: GraphConfig
    external: list[tuple[str, str, str]]  # (instance, socket kind, endpoint)
    run_dir: str
    control: str  # the launcher's control endpoint
    resume: bool = False


def group_main(launch_file: str, name: str) -> None:
    """Entry point of a group's process: `python -m respec.runtime.group FILE GROUP`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    launch = msgspec.msgpack.decode(Path(launch_file).read_bytes(), type=LaunchFile)
    plan = build_plan(launch.config)
    plan.external = {(instance, kind): endpoint for instance, kind, endpoint in launch.external}
    runtime = GroupRuntime(plan, name, Path(launch.run_dir), launch.control, launch.resume)
    runtime.log.info("group_started", pid=os.getpid(), actors=[s.instance for s in runtime.supervisors])
    started = time.time()
    profile_dir = os.environ.get("RESPEC_PROFILE_DIR")  # cProfile each group, for tuning
    if profile_dir:
        import cProfile

        cProfile.runctx("asyncio.run(runtime.serve())", globals(), {"runtime": runtime},
                        os.path.join(profile_dir, f"{name}.prof"))
    else:
        asyncio.run(runtime.serve())
    runtime.log.info("group_exited", seconds=round(time.time() - started, 3))


if __name__ == "__main__":
    group_main(sys.argv[1], sys.argv[2])
