"""`placement: ray`: the same run file, with every process group a Ray actor.

What changes against the local launcher, and nothing else does (actors, messages, the
start-up barrier, metrics and the control link are the same code):

- **Where groups run.** Each group is a ``GroupHost`` actor in one bundle of a placement
  group holding the CPUs/GPUs ``ray.groups`` gives it, so Ray reserves everything before
  anything starts and puts a restarted group back in its own bundle (the same node).
- **Addresses.** Ports must be free on the node a group lands on, which only that node
  knows, so each group picks its own tcp ports on its node's IP and announces them to
  the run's ``AddressBook`` (a named Ray actor); a group connects once every group has
  announced. The control link to the driver is tcp too.
- **Restarts.** ``run.group_restarts`` is the actors' ``max_restarts``: Ray starts a dead
  group again (the same constructor); it finds its earlier addresses in the book, binds
  them again on the same node (so the peers' sockets reconnect by themselves) and
  re-announces them. The launcher learns of it from the new incarnation's "ready" and
  handles it as a local restart (peers told, groups in flight posed again, a trainer's
  group ends the run with "--resume"). A group whose restarts are spent ends the run.
- **The cluster.** ``ray.address`` connects to an existing cluster; without it a local
  instance is started (``ray.num_cpus``) and stopped at the end. On a cluster every node
  needs respec installed and the run's paths (models, runs_dir) at the same place.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from respec.runtime.graph import ConfigError, GroupResources
from respec.runtime.group import GroupRuntime, LaunchFile
from respec.runtime.launcher import Launcher
from respec.runtime.plan import _free_port, build_plan

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # pragma: no cover - depends on the install
    raise ConfigError("run.placement: ray needs the ray package: pip install 'respec[ray]'") from None

BOOK_WAIT_S = 120.0  # a group waits this long for every other group's addresses


class AddressBook:
    """The run's address registry: each group's bound endpoints, node, pid, incarnation."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = set(groups)
        self.entries: dict[str, dict[str, Any]] = {}

    def announce(self, group: str, node_ip: str, pid: int, endpoints: list[tuple[str, str, str]]) -> int:
        incarnation = self.entries.get(group, {}).get("incarnation", 0) + 1
        self.entries[group] = {"node_ip": node_ip, "pid": pid, "endpoints": endpoints, "incarnation": incarnation}
        return incarnation

    def previous(self, group: str) -> dict[str, Any] | None:
        return self.entries.get(group)

    def book(self) -> list[tuple[str, str, str]] | None:
        """Every group's endpoints, or None while some group has not announced yet."""
        if set(self.entries) != self.groups:
            return None
        return [endpoint for entry in self.entries.values() for endpoint in entry["endpoints"]]

    def pids(self) -> dict[str, int]:
        return {group: entry["pid"] for group, entry in self.entries.items()}


class GroupHost:
    """One process group inside a Ray actor: announce addresses, then run ``GroupRuntime``
    on its own event loop thread, exactly as ``python -m respec.runtime.group`` would."""

    def __init__(self, group: str, launch: bytes, book_name: str, namespace: str) -> None:
        spec = msgspec.msgpack.decode(launch, type=LaunchFile)
        _limit_threads(spec.config.run.threads_per_group)
        plan = build_plan(spec.config)
        book = ray.get_actor(book_name, namespace=namespace)
        endpoints = self._endpoints(plan, group, ray.get(book.previous.remote(group)))
        ray.get(book.announce.remote(group, ray.util.get_node_ip_address(), os.getpid(), endpoints))
        plan.external = {(instance, kind): endpoint for instance, kind, endpoint in _wait_for_book(book)}
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # on another node the directory may not exist yet
        runtime = GroupRuntime(plan, group, run_dir, spec.control, spec.resume)
        runtime.log.info("group_started", pid=os.getpid(), placement="ray",
                         actors=[s.instance for s in runtime.supervisors])
        self.thread = threading.Thread(target=asyncio.run, args=(runtime.serve(),), name=f"group-{group}")
        self.thread.start()

    @staticmethod
    def _endpoints(plan, group: str, previous: dict[str, Any] | None) -> list[tuple[str, str, str]]:
        """This group's sockets on this node: the earlier incarnation's when it ran here
        (peers reconnect to them unaided), else fresh ports."""
        node_ip = ray.util.get_node_ip_address()
        if previous is not None:
            if previous["node_ip"] != node_ip:
                raise RuntimeError(f"process group {group!r} restarted on {node_ip}, not {previous['node_ip']}: "
                                   "moving a group to another node is not supported")
            return [tuple(endpoint) for endpoint in previous["endpoints"]]
        return [(instance, kind, f"tcp://{node_ip}:{_free_port(node_ip)}")
                for actor in plan.actors.values() if actor.spec.group == group
                for instance in actor.instances() for kind in actor.sockets()]

    def wait_done(self) -> int:
        self.thread.join()
        return 0


def _limit_threads(threads: int) -> None:
    if threads:
        import torch

        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)


def _wait_for_book(book) -> list[tuple[str, str, str]]:
    deadline = time.time() + BOOK_WAIT_S
    while time.time() < deadline:
        entries = ray.get(book.book.remote())
        if entries is not None:
            return entries
        time.sleep(0.05)
    raise TimeoutError(f"not every process group announced its addresses within {BOOK_WAIT_S}s")


class RayGroup:
    """A group's Ray actor seen through the ``subprocess.Popen`` calls the launcher makes."""

    def __init__(self, actor, name: str) -> None:
        self.actor, self.name = actor, name
        # Retried across restarts, so it only fails once Ray has given up on the actor.
        self.done = actor.wait_done.options(max_task_retries=-1).remote()
        self.returncode: int | None = None
        self.error = ""

    def poll(self) -> int | None:
        if self.returncode is None and ray.wait([self.done], timeout=0)[0]:
            try:
                self.returncode = ray.get(self.done)
            except RayActorError as error:
                self.returncode, self.error = 1, str(error).splitlines()[0]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        try:
            return ray.get(self.done, timeout=timeout)
        except GetTimeoutError:
            import subprocess

            raise subprocess.TimeoutExpired(self.name, timeout) from None
        except RayActorError:
            return 1

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RayLauncher(Launcher):
    """``Launcher`` with groups as Ray actors (see the module docstring)."""

    def run(self):
        try:
            self._connect()
            return super().run()
        finally:
            self._release()

    def _connect(self) -> None:
        spec = self.config.ray
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            options: dict[str, Any] = {"namespace": spec.namespace, "include_dashboard": False,
                                       "log_to_driver": False}
            if spec.address:
                options["address"] = spec.address
            elif spec.num_cpus:
                options["num_cpus"] = spec.num_cpus
            ray.init(**options)
        self.node_ip = ray.util.get_node_ip_address()
        self.book_name = f"respec-{self.config.run.name}-addresses-{os.getpid()}"
        self.book = ray.remote(AddressBook).options(name=self.book_name, namespace=spec.namespace,
                                                    num_cpus=0).remote(self.plan.groups())
        self.placement = None
        self.placement = self._reserve()

    def _reserve(self):
        """One bundle per group; fail before anything starts if the cluster cannot hold them."""
        bundles = [_bundle(self.config.ray.groups.get(group, GroupResources())) for group in self.plan.groups()]
        group = placement_group(bundles, strategy="PACK")
        try:
            ray.get(group.ready(), timeout=self.config.run.startup_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise ConfigError(f"ray: the process groups need {bundles}; the cluster has "
                              f"{ray.available_resources()}") from None
        return group

    def _bind_control(self, control) -> str:
        control.bind(f"tcp://{self.node_ip}:*")
        return control.getsockopt_string(zmq.LAST_ENDPOINT)

    def _spawn(self, endpoint: str) -> dict[str, RayGroup]:
        launch = msgspec.msgpack.encode(LaunchFile(self.config, [], str(self.run_dir.resolve()), endpoint,
                                                   self.resume))
        host = ray.remote(GroupHost)
        groups = {}
        for index, name in enumerate(self.plan.groups()):
            resources = self.config.ray.groups.get(name, GroupResources())
            actor = host.options(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                max_restarts=self.config.run.group_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index),
            ).remote(name, launch, self.book_name, self.config.ray.namespace)
            groups[name] = RayGroup(actor, name)
        self.log.info("run_started", run=self.config.run.name, groups=list(groups), placement="ray")
        return groups

    def _check_alive(self, processes) -> None:
        for name, group in processes.items():
            if not self.failure and group.poll() is not None:
                self.failure = (f"process group {name!r} died and Ray will not restart it "
                                f"(max_restarts={self.config.run.group_restarts}): {group.error or 'ended'}")

    def _on_event(self, event) -> None:
        if event.kind == "ready" and self.serving and event.group not in self.restarting:
            self._on_ray_restart(event.group)
        super()._on_event(event)

    def _on_ray_restart(self, name: str) -> None:
        """Ray started a dead group again; treat it as the local launcher treats its own."""
        if not self._begin_restart(name, f"process group {name!r} died"):
            return
        # super()._on_event now starts it (it is restarting) and tells the other groups
        self.log.warning("group_died", group=name, restart=self.group_restarts[name], placement="ray")
        self.view.note(f"[red]process group {name!r} died[/]: Ray restarted it ({self.group_restarts[name]})")

    def _release(self) -> None:
        if not ray.is_initialized():
            return
        for group in getattr(self, "processes", {}).values():
            ray.kill(group.actor, no_restart=True)
        if getattr(self, "placement", None) is not None:
            remove_placement_group(self.placement)
        if getattr(self, "book", None) is not None:
            ray.kill(self.book, no_restart=True)
        if getattr(self, "started_ray", False):
            ray.shutdown()


def _bundle(resources: GroupResources) -> dict[str, float]:
    bundle = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        bundle["GPU"] = resources.num_gpus
    return {key: value for key, value in bundle.items() if value}
