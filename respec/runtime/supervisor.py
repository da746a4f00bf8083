"""One actor instance under supervision: its inbound sockets, dispatch, and restarts.

Messages are handled one at a time per instance (the actor's state needs no locks). A
handler or `run()` that raises is a crash: it is logged, traced and reported, and the
actor is rebuilt from its class after a back-off that doubles each time, on the same
sockets, so nothing queued is lost. After `max_restarts` crashes the actor gives up and
the run stops with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from typing import TYPE_CHECKING, Any

import zmq

from respec.messages import Channel, Envelope, ErrorReport, FrameError, Message, decode
from respec.messages.codec import split_header
from respec.runtime.actor import Actor
from respec.runtime.context import ActorContext
from respec.runtime.plan import INBOX, PUB, RPC, ActorPlan
from respec.runtime.sockets import Port

RECV_BATCH = 256  # messages taken from one socket before looking at the others
IDLE_POLL_S = 0.05

if TYPE_CHECKING:
    from respec.runtime.group import GroupRuntime


class ActorSupervisor:
    def __init__(self, instance: str, actor: ActorPlan, group: GroupRuntime) -> None:
        self.instance = instance
        self.plan = actor
        self.group = group
        self.context = ActorContext(instance, group.plan, group)
        self.actor: Actor | None = None
        self.restarts = 0
        self.handled = 0
        self.rejected = 0
        self.gave_up = False
        self._lock = asyncio.Lock()  # one message at a time per instance
        self._inbound: list[tuple[Port, Any]] = []
        self._tasks: list[asyncio.Task] = []
        self._run_task: asyncio.Task | None = None
        self.subscriptions_seen = 0
        self._rpc: Port | None = None

    # --- wiring ---------------------------------------------------------------------------
    def bind(self, zmq_context) -> None:
        hwm = self.group.plan.config.run.hwm
        for kind in self.plan.sockets():
            if kind == INBOX:
                port = Port(zmq_context, zmq.PULL, hwm, f"{self.instance}:inbox")
                port.bind(*self.group.endpoints(self.instance, INBOX))
                self._inbound.append((port, self._on_work))
            elif kind == RPC:
                port = Port(zmq_context, zmq.ROUTER, hwm, f"{self.instance}:rpc")
                port.bind(*self.group.endpoints(self.instance, RPC))
                self.context.set_locality(port.name, self._requester_groups())
                self._rpc = port
                self._inbound.append((port, self._on_request))
            elif kind == PUB:
                self.context.bind_pub(zmq_context)

    def _requester_groups(self) -> list[str]:
        requests = [t for t in self.plan.handles if t.channel is Channel.REQUEST]
        plan = self.group.plan
        return [plan.actors[name].spec.group for t in requests for name in plan.senders_of(t)]

    def connect(self, zmq_context) -> None:
        self.context.connect(zmq_context)
        self._subscribe(zmq_context)

    def _subscribe(self, zmq_context) -> None:
        topics = [t for t in self.plan.handles if t.channel is Channel.BROADCAST]
        if not topics:
            return
        port = Port(zmq_context, zmq.SUB, self.group.plan.config.run.hwm, f"{self.instance}:sub")
        for topic in topics:
            port.socket.setsockopt(zmq.SUBSCRIBE, topic.__name__.encode())
            for name in self.group.plan.senders_of(topic):
                for peer in self.group.plan.actors[name].instances():
                    port.connect(self.group.plan.address(peer, PUB, self.group.name))
        self._inbound.append((port, self._on_broadcast))

    async def wait_for_subscribers(self, timeout_s: float) -> None:
        """A publisher waits until every subscriber is connected: no broadcast is lost."""
        pub = self.context.pub
        expected = self.group.plan.expected_subscriptions(self.instance)
        if pub is None:
            return
        try:
            await asyncio.wait_for(self._count_subscriptions(pub, expected), timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"{self.instance}: {self.subscriptions_seen}/{expected} subscribers joined "
                f"within {timeout_s}s"
            ) from None

    async def _count_subscriptions(self, pub: Port, expected: int) -> None:
        while self.subscriptions_seen < expected:
            frames = await pub.receive()
            if bytes(frames[0])[:1] == b"\x01":
                self.subscriptions_seen += 1

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            await self._start_instance()
        self._wakeup = asyncio.Event()
        for port, _ in self._inbound:
            port.watch(self._wakeup.set)
        for port in self.context.dealers.values():
            port.watch(lambda port=port: self._drain_replies(port))
        if self.context.pub is not None:  # later (re)subscriptions must not pile up unread
            self.context.pub.watch(lambda: self._drain(self.context.pub))
        self._tasks.append(asyncio.create_task(self._dispatch_forever()))
        self._tasks.append(asyncio.create_task(self._kick_forever()))

    async def _dispatch_forever(self) -> None:
        """Handle whatever is queued on any inbound socket, then sleep until woken."""
        while True:
            self._wakeup.clear()
            handled = 0
            for port, deliver in self._inbound:
                for _ in range(RECV_BATCH):
                    frames = port.try_receive()
                    if frames is None:
                        break
                    handled += 1
                    await deliver(frames)
            if not handled:
                await self._wakeup.wait()

    async def _kick_forever(self) -> None:
        """Safety net: wake the dispatcher now and then, in case an edge was missed."""
        while True:
            await asyncio.sleep(IDLE_POLL_S)
            self._wakeup.set()

    def _drain_replies(self, port: Port) -> None:
        """Replies resolve futures at once, outside the handler lock (a handler may await one)."""
        while (frames := port.try_receive()) is not None:
            self.context.receive_reply(frames)

    @staticmethod
    def _drain(port: Port) -> None:
        while port.try_receive() is not None:
            pass

    async def _start_instance(self) -> None:
        """(Re)build the actor from its class and run its hooks; a failure here is a crash."""
        while True:
            try:
                self.actor = self.plan.cls(self.plan.params, self.context)
                await self.actor.on_start()
                self._run_task = asyncio.create_task(self._run_actor(self.actor))
                return
            except Exception as error:  # noqa: BLE001 - any failure is a crash to supervise
                if not await self._crashed(error, "on_start", ""):
                    return

    async def _run_actor(self, actor: Actor) -> None:
        try:
            await actor.run()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001
            async with self._lock:
                if actor is self.actor and await self._crashed(error, "run", ""):
                    await self._start_instance()

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._run_task] if self._run_task else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.actor is not None and not self.gave_up:
            async with self._lock:
                with contextlib.suppress(Exception):
                    await self.actor.on_stop()
        self.context.close()
        for port, _ in self._inbound:
            port.close()

    # --- inbound --------------------------------------------------------------------------
    async def _on_work(self, frames: list[Any]) -> None:
        decoded = self._decode(frames)
        if decoded is not None:
            await self._dispatch(*decoded, frames)

    async def _on_broadcast(self, frames: list[Any]) -> None:
        decoded = self._decode(frames[1:])  # frame 0 is the topic
        if decoded is not None:
            await self._dispatch(*decoded, frames[1:])

    async def _on_request(self, frames: list[Any]) -> None:
        identity, message = frames[0], frames[1:]
        decoded = self._decode(message)
        if decoded is None:
            return
        envelope, body = decoded
        reply = await self._dispatch(envelope, body, message)
        if reply is None:
            reply = ErrorReport(actor=self.instance, kind="no_reply", error="the handler returned no reply")
        elif not isinstance(reply, Message):
            reply = ErrorReport(actor=self.instance, kind="bad_reply", error=f"returned {type(reply).__name__}")
        reply_envelope = self.context.envelope(
            reply, reply_to=envelope.id, correlation_id=envelope.correlation_id
        )
        reply_frames = self.context.encode_for(self._rpc, reply_envelope, reply)
        await self._rpc.send([identity, *reply_frames])
        self.group.trace.message("send", self.instance, reply_frames)

    def _decode(self, frames: list[Any]) -> tuple[Envelope, Message] | None:
        try:
            return decode(frames)
        except FrameError as error:
            self.group.reject(self.instance, frames, error)
            return None

    async def _dispatch(self, envelope: Envelope, body: Message, frames: list[Any]) -> Any:
        method = self.plan.handles.get(type(body))
        if method is None:
            self.group.reject(self.instance, frames, FrameError(f"{self.plan.name} has no handler for {envelope.type}"))
            return None
        async with self._lock:
            if self.gave_up or self.actor is None:
                return ErrorReport(actor=self.instance, kind="gave_up", error="actor has given up", message_id=envelope.id)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                result = await getattr(self.actor, method)(body, envelope)
            except Exception as error:  # noqa: BLE001 - a crash, supervised
                report = self._error_report(error, envelope.id)
                if await self._crashed(error, method, envelope.id, frames):
                    await self._start_instance()
                return report
            self.handled += 1
            self.group.trace.message("recv", self.instance, frames, loop.time() - started)
            return result

    # --- crashes --------------------------------------------------------------------------
    def _error_report(self, error: BaseException, message_id: str) -> ErrorReport:
        return ErrorReport(
            actor=self.instance, kind="crash", error=f"{type(error).__name__}: {error}",
            message_id=message_id, restarts=self.restarts,
            traceback="".join(traceback.format_exception(error)),
        )

    async def _crashed(self, error: BaseException, where: str, message_id: str, frames=None) -> bool:
        """Record a crash; wait the back-off and return True to restart, False if giving up."""
        policy = self.plan.spec.restart
        report = self._error_report(error, message_id)
        envelope = bytes(split_header(frames[0])[0]) if frames else None
        self.group.trace.event("crash", self.instance, f"{where}: {report.error}", envelope)
        self.group.log.error("actor_crashed", actor=self.instance, where=where, error=report.error,
                             message_id=message_id, restarts=self.restarts, traceback=report.traceback)
        self.group.actor_event("crash", self.instance, error=report.error, where=where)
        if self.restarts >= policy.max_restarts:
            self.gave_up = True
            reason = f"{self.instance} gave up after {self.restarts} restarts: {report.error}"
            self.group.trace.event("gave_up", self.instance, reason)
            self.group.actor_event("gave_up", self.instance, reason=reason)
            return False
        delay = min(policy.backoff_s * 2**self.restarts, policy.backoff_max_s)
        self.restarts += 1
        await asyncio.sleep(delay)
        self.group.trace.event("restart", self.instance, f"restart {self.restarts} after {delay:.3f}s")
        self.group.log.warning("actor_restarted", actor=self.instance, restarts=self.restarts)
        return True
