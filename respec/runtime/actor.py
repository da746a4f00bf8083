"""The Actor base class: state plus handlers for message types, nothing shared.

A subclass declares what it handles with `@handles(Type)` on async methods, what it emits
in `sends`, and its YAML parameters as a `Params` struct. It talks only through
`send` (work queues and broadcasts, chosen by the message type's channel) and `request`
(awaits the reply). The runtime owns the sockets; a restarted actor gets a fresh instance
on the same sockets, so queued messages are not lost.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from respec.messages import Message

if TYPE_CHECKING:
    from respec.runtime.context import ActorContext


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of an actor that takes none."""


def handles(*types: type[Message], optional: bool = False) -> Callable:
    """Mark an async method as the handler of these message types: `async def f(self, msg, env)`.

    `optional=True`: an input the actor can run without (a Generator without a Scheduler);
    otherwise a graph where nobody sends the type is an error, caught before the run.
    """
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, Message)):
            raise TypeError(f"@handles takes message types, got {kind!r}")

    def mark(method: Callable) -> Callable:
        method.__respec_handles__ = types
        method.__respec_optional__ = optional
        return method

    return mark


class Actor:
    Params: ClassVar[type[msgspec.Struct]] = NoParams
    sends: ClassVar[tuple[type[Message], ...]] = ()  # every type it may send or publish
    # sent only when some actor in the graph handles them (e.g. distillation samples)
    optional_sends: ClassVar[tuple[type[Message], ...]] = ()
    # False: if this actor's process dies mid-run, restarting the process would lose state
    # the run cannot rebuild (the policy being trained); the run stops instead (--resume).
    process_restartable: ClassVar[bool] = True
    # Whether its PolicyWeights / DraftWeights handlers load the tensors (False: they read
    # only the version and metadata): a trainer picks how to hand weights over (cuda_ipc,
    # file, ...) from the devices of the actors that load them.
    reads_weights: ClassVar[bool] = True

    def __init__(self, params: Any, context: ActorContext) -> None:
        self.params = params
        self.context = context
        self.name = context.instance  # "<actor>/<replica>"
        self.log = context.log

    # --- declared interface -------------------------------------------------------------
    @classmethod
    def handled_types(cls) -> dict[type[Message], str]:
        """Message type -> name of the method that handles it (subclasses may override)."""
        table: dict[type[Message], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for kind in getattr(value, "__respec_handles__", ()):
                    table[kind] = attr
        return table

    @classmethod
    def optional_types(cls) -> set[type[Message]]:
        """Handled types the actor can do without (see `handles(optional=True)`)."""
        return {kind for kind, attr in cls.handled_types().items()
                if getattr(getattr(cls, attr), "__respec_optional__", False)}

    @classmethod
    def check_plan(cls, name: str, params: Any, plan: Any) -> list[str]:
        """Problems with this actor's parameters that only the whole graph reveals (a
        batch bigger than a peer's buffer, sizes two actors must agree on); each a message
        naming the keys. Run by `build_plan` before anything starts."""
        return []

    # --- lifecycle hooks ----------------------------------------------------------------
    async def on_start(self) -> None:
        """Called once the whole graph is connected (and after every restart)."""

    async def run(self) -> None:
        """Optional long-running task (a source of work); it runs beside the handlers."""

    async def on_peer_restarted(self, group: str) -> None:
        """Process group `group` died and was restarted: messages it held are lost (requests
        to it have already failed with RemoteError). Re-send what must not be lost here."""

    async def on_stop(self) -> None:
        """Called when the run ends; flush and release here."""

    # --- talking ------------------------------------------------------------------------
    async def send(self, body: Message, **envelope: Any) -> None:
        """Send a work message to every group that handles it, or publish a broadcast."""
        await self.context.send(body, **envelope)

    async def request(self, body: Message, timeout_s: float | None = None, **envelope: Any):
        """Send a request and await its reply body."""
        return await self.context.request(body, timeout_s=timeout_s, **envelope)

    def report(self, step: int, **values: float) -> None:
        """Metrics for the runtime (metrics.jsonl, the progress view)."""
        self.context.report(step, values)

    def progress(self, done: int, total: int, label: str = "") -> None:
        """Tell the progress view how far this actor's work has gone."""
        self.context.progress(done, total, label)

    def finish_run(self, reason: str = "done") -> None:
        """Ask the runtime to end the whole run normally."""
        self.context.finish_run(reason)

    def summarize(self, **values: Any) -> None:
        """Top-level entries for the run's summary.json (e.g. accuracy at start and end)."""
        self.context.summarize(values)

    # --- where the run lives ------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """runs/<name>: checkpoints and other run files go here."""
        return self.context.group.run_dir

    @property
    def resuming(self) -> bool:
        """True under `respec run --resume`: restore the latest checkpoint, if any."""
        return self.context.group.resume
