"""From a typed run file to a runnable plan: classes imported, routes and addresses fixed.

Everything that can be wrong with a graph is found here, before any process starts:
a class that cannot be imported or is not an Actor, parameters of the wrong type, a
handler for a message that nobody sends, a message sent that nobody handles.
"""

from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass, field
from typing import Any

import msgspec

from respec.messages import Channel, Message
from respec.runtime.actor import Actor
from respec.runtime.graph import ActorSpec, ConfigError, GraphConfig, readable_error

INBOX, RPC, PUB = "inbox", "rpc", "pub"


@dataclass(frozen=True)
class ActorPlan:
    name: str
    spec: ActorSpec
    cls: type[Actor]
    params: Any
    handles: dict[type[Message], str]
    sends: tuple[type[Message], ...]

    def sockets(self) -> list[str]:
        """Which bound sockets each replica needs."""
        kinds = []
        if any(t.channel is Channel.WORK for t in self.handles):
            kinds.append(INBOX)
        if any(t.channel is Channel.REQUEST for t in self.handles):
            kinds.append(RPC)
        if any(t.channel is Channel.BROADCAST for t in self.sends):
            kinds.append(PUB)
        return kinds

    def instances(self) -> list[str]:
        return [f"{self.name}/{replica}" for replica in range(self.spec.replicas)]


@dataclass
class GraphPlan:
    config: GraphConfig
    actors: dict[str, ActorPlan]
    # bound endpoint of (instance, socket kind) for peers in other process groups
    external: dict[tuple[str, str], str] = field(default_factory=dict)
    _handlers: dict[type[Message], list[str]] = field(default_factory=dict, repr=False)

    def group_of(self, instance: str) -> str:
        return self.actors[instance.split("/")[0]].spec.group

    def groups(self) -> list[str]:
        return sorted({plan.spec.group for plan in self.actors.values()})

    def handlers_of(self, kind: type[Message]) -> list[str]:
        """Actors handling a type (cached: `send` asks for every message)."""
        cached = self._handlers.get(kind)
        if cached is None:
            cached = self._handlers[kind] = [name for name, plan in self.actors.items() if kind in plan.handles]
        return cached

    def senders_of(self, kind: type[Message]) -> list[str]:
        return [name for name, plan in self.actors.items() if kind in plan.sends]

    def inproc(self, instance: str, kind: str) -> str:
        return f"inproc://{self.config.run.name}/{instance}/{kind}"

    def address(self, instance: str, kind: str, from_group: str) -> str:
        """Where a peer in `from_group` connects: inproc when it shares the process."""
        if self.group_of(instance) == from_group:
            return self.inproc(instance, kind)
        return self.external[(instance, kind)]

    def expected_subscriptions(self, instance: str) -> int:
        """Subscriptions a publisher must see before the graph may start (no lost broadcast)."""
        published = set(self.actors[instance.split("/")[0]].sends)
        count = 0
        for plan in self.actors.values():
            topics = {t for t in plan.handles if t.channel is Channel.BROADCAST} & published
            count += len(topics) * plan.spec.replicas
        return count


def build_plan(config: GraphConfig, source: str = "<config>", ipc_dir: str = "") -> GraphPlan:
    actors = {name: _plan_actor(name, spec, source, config.run.seed) for name, spec in config.actors.items()}
    plan = GraphPlan(config, actors)
    _check_routes(plan, source)
    _check_actors(plan, source)
    if ipc_dir or config.run.transport == "tcp":
        _assign_external(plan, ipc_dir)
    return plan


def _plan_actor(name: str, spec: ActorSpec, source: str, run_seed: int) -> ActorPlan:
    where = f"{source}: actors.{name}"
    cls = _import_class(spec.cls, f"{where}.class")
    if not (isinstance(cls, type) and issubclass(cls, Actor)):
        raise ConfigError(f"{where}.class: {spec.cls!r} is not an Actor (respec.runtime.Actor)")
    try:
        params = msgspec.convert(_seeded(spec.params, cls, run_seed), cls.Params)
    except msgspec.ValidationError as error:
        detail = readable_error(str(error))
        raise ConfigError(f"{where}.params.{detail}" if ": " in detail else f"{where}.params: {detail}") from None
    return ActorPlan(name, spec, cls, params, cls.handled_types(),
                      (*cls.sends, *cls.optional_sends))  # an optional output still gets its sockets


def _seeded(params: dict[str, Any], cls: type, run_seed: int) -> dict[str, Any]:
    """`run.seed` for an actor that takes a seed and is not given its own: one number in the
    run file varies the data order, sampling and initialisations of a whole run."""
    if "seed" in getattr(cls.Params, "__struct_fields__", ()) and "seed" not in params:
        return {**params, "seed": run_seed}
    return params


def _import_class(path: str, where: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}: {path!r} is not an import path 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{where}: cannot import {path!r}: {error}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{where}: cannot import {path!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def _check_routes(plan: GraphPlan, source: str) -> None:
    sent = {kind for actor in plan.actors.values() for kind in actor.sends}
    for name, actor in plan.actors.items():
        optional = actor.cls.optional_types()
        for kind in actor.handles:
            if kind.channel is not Channel.CONTROL and kind not in sent and kind not in optional:
                raise ConfigError(
                    f"{source}: actors.{name}: handles {kind.__name__}, but no actor in the "
                    f"graph sends it ({actor.cls.__name__}.{actor.handles[kind]} would never run)"
                )
        for kind in actor.sends:
            handlers = plan.handlers_of(kind)
            if kind.channel in (Channel.WORK, Channel.REQUEST) and not handlers \
                    and kind not in actor.cls.optional_sends:
                raise ConfigError(
                    f"{source}: actors.{name}: sends {kind.__name__}, but no actor in the graph "
                    "handles it"
                )
            if kind.channel is Channel.REQUEST and len(handlers) > 1:
                raise ConfigError(
                    f"{source}: actors.{name}: request {kind.__name__} is handled by "
                    f"{', '.join(handlers)}; a request needs exactly one handling actor"
                )


def _check_actors(plan: GraphPlan, source: str) -> None:
    problems = [f"{source}: actors.{name}: {problem}" for name, actor in plan.actors.items()
                for problem in actor.cls.check_plan(name, actor.params, plan)]
    if problems:
        raise ConfigError("\n".join(problems))


def _assign_external(plan: GraphPlan, ipc_dir: str) -> None:
    run = plan.config.run
    for actor in plan.actors.values():
        for instance in actor.instances():
            for kind in actor.sockets():
                if run.transport == "tcp":
                    plan.external[(instance, kind)] = f"tcp://{run.host}:{_free_port(run.host)}"
                else:
                    safe = instance.replace("/", "-")
                    plan.external[(instance, kind)] = f"ipc://{ipc_dir}/{safe}-{kind}"


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
