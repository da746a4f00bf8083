"""What an actor instance sees of the runtime: its outbound sockets and the control link.

The context outlives actor instances: when the supervisor restarts a crashed actor, the
new instance gets the same context, so sockets, queued messages and pending requests
survive the restart.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import zmq

from respec.messages import Channel, Envelope, FrameError, Message, decode, encode
from respec.messages.envelope import SCHEMA_VERSION
from respec.runtime.plan import INBOX, PUB, RPC, GraphPlan
from respec.runtime.sockets import Port

if TYPE_CHECKING:
    from respec.runtime.group import GroupRuntime


class RemoteError(RuntimeError):
    """The handler of a request raised; the message carries its error."""


class ActorContext:
    def __init__(self, instance: str, plan: GraphPlan, group: GroupRuntime) -> None:
        self.instance = instance
        self.actor_name = instance.split("/")[0]
        self.plan = plan
        self.group = group
        self.trace = group.trace
        self.log = group.log.bind(actor=instance)
        self.pub: Port | None = None
        self.push: dict[str, Port] = {}  # work queues, by handling actor name
        self.dealers: dict[str, Port] = {}  # request channels, by handling actor name
        self.local_only: dict[str, bool] = {}  # port name -> every peer shares the process
        self.shared_memory: dict[str, bool] = {}  # port name -> one receiver, another process, same host
        self.pending: dict[str, asyncio.Future] = {}
        self.sent = 0
        self._seq = 0

    # --- wiring ---------------------------------------------------------------------------
    def connect(self, zmq_context) -> None:
        """Create the outbound sockets: PUSH and DEALER to every actor we may message."""
        hwm = self.plan.config.run.hwm
        me = self.plan.actors[self.actor_name]
        targets = {
            (name, kind.channel)
            for kind in me.sends
            if kind.channel in (Channel.WORK, Channel.REQUEST)
            for name in self.plan.handlers_of(kind)
        }
        for name, channel in sorted(targets, key=lambda t: (t[0], t[1].value)):
            work = channel is Channel.WORK
            port = Port(zmq_context, zmq.PUSH if work else zmq.DEALER, hwm, f"{name}:{channel.value}")
            peers = self.plan.actors[name].instances()
            port.connect(*(self.plan.address(p, INBOX if work else RPC, self.group.name) for p in peers))
            self.set_locality(port.name, [self.plan.group_of(p) for p in peers])
            (self.push if work else self.dealers)[name] = port

    def bind_pub(self, zmq_context) -> None:
        self.pub = Port(zmq_context, zmq.XPUB, self.plan.config.run.hwm, f"{self.instance}:pub")
        self.pub.bind(*self.group.endpoints(self.instance, PUB))
        subscriber_groups = {
            plan.spec.group
            for plan in self.plan.actors.values()
            if any(t in plan.handles for t in self.plan.actors[self.actor_name].sends)
        }
        self.local_only[self.pub.name] = subscriber_groups <= {self.group.name}
        self.shared_memory[self.pub.name] = False  # many receivers: nobody may recycle a segment

    def set_locality(self, port_name: str, peer_groups: list[str]) -> None:
        local = all(group == self.group.name for group in peer_groups)
        self.local_only[port_name] = local
        self.shared_memory[port_name] = not local and self.plan.config.run.transport == "ipc"

    def encode_for(self, port: Port, envelope: Envelope, body: Message) -> list[Any]:
        return encode(envelope, body, self.local_only[port.name], self.shared_memory[port.name])

    # --- sending --------------------------------------------------------------------------
    def envelope(self, body: Message, reply_to: str = "", **fields: Any) -> Envelope:
        self._seq += 1
        return Envelope(
            SCHEMA_VERSION, f"{self.instance}#{self._seq}", type(body).__name__, self.instance,
            time.time(), reply_to=reply_to, **fields,
        )

    async def send(self, body: Message, **fields: Any) -> None:
        channel = type(body).channel
        if channel is Channel.CONTROL:
            self.group.actor_event("message", self.instance, body=body)
            return
        if channel is Channel.REQUEST:
            raise TypeError(f"{type(body).__name__} is a request: use `await self.request(...)`")
        handlers = self.plan.handlers_of(type(body))
        if not handlers and type(body) in self.plan.actors[self.actor_name].cls.optional_sends:
            return  # an optional output nobody in this graph consumes
        envelope = self.envelope(body, **fields)
        if channel is Channel.BROADCAST:
            await self._broadcast(envelope, body)
            return
        for name in handlers:
            if name not in self.push:
                raise TypeError(f"{self.actor_name} does not declare {type(body).__name__} in `sends`")
            port = self.push[name]
            frames = self.encode_for(port, envelope, body)
            await port.send(frames)
            self.trace.message("send", self.instance, frames)
        self.sent += 1

    async def _broadcast(self, envelope: Envelope, body: Message) -> None:
        if self.pub is None:
            raise TypeError(f"{self.actor_name} does not declare {type(body).__name__} in `sends`")
        frames = self.encode_for(self.pub, envelope, body)
        await self.pub.send([envelope.type.encode(), *frames])
        self.trace.message("send", self.instance, frames)
        self.sent += 1

    async def request(self, body: Message, timeout_s: float | None = None, **fields: Any) -> Message:
        kind = type(body)
        if kind.channel is not Channel.REQUEST:
            raise TypeError(f"{kind.__name__} is not a request type; use `send`")
        name = self.plan.handlers_of(kind)[0]
        port = self.dealers.get(name)
        if port is None:
            raise TypeError(f"{self.actor_name} does not declare {kind.__name__} in `sends`")
        envelope = self.envelope(body, **fields)
        future = asyncio.get_running_loop().create_future()
        future.respec_group = self.plan.actors[name].spec.group  # see fail_requests_to
        self.pending[envelope.id] = future
        frames = self.encode_for(port, envelope, body)
        try:
            await port.send(frames)
            self.trace.message("send", self.instance, frames)
            self.sent += 1
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self.pending.pop(envelope.id, None)

    def receive_reply(self, frames: list[Any]) -> None:
        """A reply on a DEALER socket: resolve the future of the request it answers."""
        try:
            envelope, body = decode(frames)
        except FrameError as error:
            self.group.reject(self.instance, frames, error)
            return
        self.trace.message("recv", self.instance, frames)
        future = self.pending.get(envelope.reply_to)
        if future is None or future.done():
            self.log.warning("reply_without_request", reply_to=envelope.reply_to)
            return
        if type(body).__name__ == "ErrorReport":
            future.set_exception(RemoteError(f"{body.actor} failed on the request: {body.error}"))
        else:
            future.set_result(body)

    def fail_requests_to(self, group: str) -> None:
        """Requests whose handler lived in `group`, which died: their replies will never come."""
        for future in self.pending.values():
            if getattr(future, "respec_group", None) == group and not future.done():
                future.set_exception(RemoteError(f"process group {group!r} died with this request in flight"))

    # --- to the runtime -------------------------------------------------------------------
    def report(self, step: int, values: dict[str, float]) -> None:
        self.group.actor_event("metrics", self.instance, step=step, values=values)

    def progress(self, done: int, total: int, label: str) -> None:
        self.group.actor_event("progress", self.instance, done=done, total=total, label=label)

    def finish_run(self, reason: str) -> None:
        self.group.actor_event("finish", self.instance, reason=reason)

    def summarize(self, values: dict) -> None:
        self.group.actor_event("summary", self.instance, values=values)

    def send_waits(self) -> int:
        """How many sends had to wait for room (back-pressure), over all our sockets."""
        return sum(port.waits for port in self._ports())

    def _ports(self) -> list[Port]:
        return [*self.push.values(), *self.dealers.values(), *([self.pub] if self.pub else [])]

    def close(self) -> None:
        for port in self._ports():
            port.close()
