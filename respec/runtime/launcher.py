"""`respec run CONFIG`: start every process group, watch them, stop them cleanly.

The launcher owns the run directory (resolved config, metrics, summary), the control
link to the groups, the live progress view and the exit code: 0 when an actor ended the
run, non-zero with the reason when an actor gave up, a group died or the run timed out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from respec import log as logging_setup
from respec.messages import shared_memory
from respec.runtime import protocol, run_files
from respec.runtime.graph import GraphConfig, config_to_yaml, load_config
from respec.runtime.group import LaunchFile
from respec.runtime.plan import build_plan
from respec.runtime.progress import ProgressView

INTERRUPTED = "interrupted (Ctrl-C)"


@dataclass
class RunResult:
    run_dir: Path
    ok: bool
    reason: str
    wall_s: float
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130  # the shell's code for Ctrl-C
        return 0 if self.ok else 1


def run_file(path: str | Path, name: str | None = None, overrides: dict | None = None,
             progress: bool = True, resume: bool = False) -> RunResult:
    overrides = dict(overrides or {})
    if name:
        overrides["run.name"] = name
    config = load_config(path, overrides)
    if config.run.placement == "ray":
        from respec.runtime.ray_placement import RayLauncher  # ray is an optional extra

        return RayLauncher(config, str(path), progress, resume).run()
    return Launcher(config, str(path), progress, resume).run()


class Launcher:
    def __init__(self, config: GraphConfig, source: str = "<config>", progress: bool = True,
                 resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self.ipc_dir = tempfile.mkdtemp(prefix="respec-")
        self.plan = build_plan(config, source, self.ipc_dir)  # all validation happens here
        self.run_dir = Path(config.run.runs_dir) / config.run.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resumed_from = run_files.prepare_run_dir(self.run_dir, resume)
        # a resumed run's metrics continue the earlier attempt's clock
        self.clock_offset = run_files.time_offset(self.run_dir) if self.resumed_from else 0.0
        (self.run_dir / "config.yaml").write_text(config_to_yaml(config))
        self.log = logging_setup.configure(self.run_dir / "log.jsonl", console=True, process="launcher")
        self.view = ProgressView(config.run.name, enabled=progress)
        self.stats: dict[str, Any] = {}
        self.metrics: list[dict[str, Any]] = []
        self.failure = ""
        self.finish_reason = ""
        self.summary: dict[str, Any] = {}  # what actors asked to put in summary.json
        self.serving = False
        self.group_restarts: dict[str, int] = dict.fromkeys(self.plan.groups(), 0)
        self.restarting: set[str] = set()
        self.started = time.time()

    # --- the run --------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = self.started = time.time()
        context = zmq.Context()
        control = context.socket(zmq.ROUTER)
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a command to a missing group errors, never vanishes
        endpoint = self._bind_control(control)
        processes = self._spawn(endpoint)
        self.control, self.processes = control, processes
        try:
            with self.view:
                self._start(control, processes)
                if not self.failure:
                    self.serving = True  # from here on a dead group is restarted
                    self._watch(control, processes, started)
                self.serving = False
                self._stop(control, processes)
        except KeyboardInterrupt:
            self.failure = INTERRUPTED
            self.serving = False
            self._stop(control, processes)
        finally:
            control.close()
            context.term()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
            shared_memory.remove_scope(self.config.run.name)
        return self._finish(started)

    def _bind_control(self, control) -> str:
        endpoint = f"ipc://{self.ipc_dir}/control"
        control.bind(endpoint)
        return endpoint

    def _spawn(self, endpoint: str) -> dict[str, subprocess.Popen]:
        """One fresh interpreter per group (no fork: unsafe with torch and threads)."""
        external = [(instance, kind, address) for (instance, kind), address in self.plan.external.items()]
        launch = LaunchFile(self.config, external, str(self.run_dir.resolve()), endpoint, self.resume)
        self.launch_file = Path(self.ipc_dir) / "launch.msgpack"
        self.launch_file.write_bytes(msgspec.msgpack.encode(launch))
        processes = {group: self._spawn_group(group) for group in self.plan.groups()}
        self.log.info("run_started", run=self.config.run.name, groups=list(processes))
        return processes

    def _spawn_group(self, group: str) -> subprocess.Popen:
        environment = dict(os.environ)
        if self.config.run.threads_per_group:
            threads = str(self.config.run.threads_per_group)
            environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        command = [sys.executable, "-m", "respec.runtime.group", str(self.launch_file), group]
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment)

    def _start(self, control, processes) -> None:
        """Wait for every group's "ready" (the start-up barrier), then start them all."""
        waiting = set(processes)
        deadline = time.time() + self.config.run.startup_timeout_s
        while waiting and not self.failure:
            if time.time() > deadline:
                self.failure = f"groups not ready within {self.config.run.startup_timeout_s}s: {sorted(waiting)}"
                break
            event = self._receive(control, processes, timeout_ms=200)
            if event is not None and event.kind == "ready":
                waiting.discard(event.group)
        if not self.failure:
            self._broadcast(control, processes, "start")

    def _watch(self, control, processes, started: float) -> None:
        run = self.config.run
        while not self.failure and not self.finish_reason:
            self._receive(control, processes, timeout_ms=100)
            elapsed = time.time() - started
            if run.timeout_s and elapsed > run.timeout_s:
                self.failure = f"run timed out after {run.timeout_s}s"
            elif run.stop_after_s and elapsed > run.stop_after_s:
                self.finish_reason = f"stop_after_s={run.stop_after_s} reached"

    def _stop(self, control, processes) -> None:
        self._broadcast(control, processes, "stop")
        deadline = time.time() + 15
        running = {g for g, p in processes.items() if p.poll() is None}
        while running and time.time() < deadline:
            event = self._receive(control, processes, timeout_ms=100, watch_deaths=False)
            if event is not None and event.kind == "stopped":
                running.discard(event.group)
            running = {g for g in running if processes[g].poll() is None}
        for group, process in processes.items():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.log.warning("group_terminated", group=group)
                process.kill()
                process.wait(timeout=5)

    # --- control link ---------------------------------------------------------------------
    def _broadcast(self, control, processes, kind: str) -> None:
        for group in processes:
            self._send(group, protocol.LauncherCommand(kind))

    def _receive(self, control, processes, timeout_ms: int, watch_deaths: bool = True):
        if not control.poll(timeout_ms):
            if watch_deaths:
                self._check_alive(processes)
            return None
        _identity, raw = control.recv_multipart()
        event = protocol.event_decoder.decode(raw)
        self._on_event(event)
        return event

    def _check_alive(self, processes) -> None:
        for group, process in processes.items():
            if process.poll() is None or self.failure:
                continue
            died = f"process group {group!r} died (exit code {process.returncode})"
            if not self.serving or self.group_restarts[group] >= self.config.run.group_restarts:
                self.failure = died if not self.serving else f"{died}; no restarts left"
                continue
            if not self._begin_restart(group, died):
                continue
            self.log.warning("group_died", group=group, exit_code=process.returncode,
                             restart=self.group_restarts[group])
            self.view.note(f"[red]{died}[/]: restarting it ({self.group_restarts[group]})")
            processes[group] = self._spawn_group(group)

    def _begin_restart(self, group: str, died: str) -> bool:
        """Count a restart of a dead group and mark it restarting; False, with the run's
        failure set, when it held an actor whose state only a checkpoint brings back."""
        holders = [name for name, actor in self.plan.actors.items()
                   if actor.spec.group == group and not actor.cls.process_restartable]
        if holders:
            self.failure = (f"{died}; it held {', '.join(holders)}, whose state lives in checkpoints: "
                            f"continue with `respec run ... --resume`")
            return False
        self.group_restarts[group] += 1
        self.restarting.add(group)
        return True

    def _on_group_ready_again(self, group: str) -> None:
        """A restarted group finished its set-up: start it, and tell every other group."""
        self.restarting.discard(group)
        self._send(group, protocol.LauncherCommand("start"))
        for other in self.processes:
            if other != group:
                self._send(other, protocol.LauncherCommand("peer_restarted", group))
        self.log.info("group_restarted", group=group)

    def _send(self, group: str, command: protocol.LauncherCommand) -> None:
        try:
            self.control.send_multipart([group.encode(), protocol.encoder.encode(command)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a group that is gone cannot be told

    def _on_event(self, event: protocol.GroupEvent) -> None:
        data = event.data
        if event.kind == "ready" and event.group in self.restarting:
            self._on_group_ready_again(event.group)
        elif event.kind == "stats" or event.kind == "stopped":
            self.stats.update(data.get("data", {}))
            self.view.update_stats(data.get("data", {}))
        elif event.kind == "progress":
            self.view.update_progress(event.actor, data["done"], data["total"], data.get("label", ""))
        elif event.kind == "metrics":
            self._on_metrics(event.actor, data["step"], data["values"])
        elif event.kind == "message":
            self._on_message(event.actor, data)
        elif event.kind == "crash":
            self.view.note(f"[red]{event.actor} crashed[/] ({data.get('where')}): {data.get('error')}")
        elif event.kind == "gave_up":
            self.failure = data["reason"]
        elif event.kind == "failed":
            self.failure = f"group {event.group!r} failed to start: {data.get('error')}"
        elif event.kind == "summary":
            self.summary.update(data.get("values", {}))
        elif event.kind == "finish" and not self.finish_reason:
            self.finish_reason = f"{event.actor}: {data.get('reason', 'done')}"
        elif event.kind == "rejected":
            self.view.note(f"[yellow]{event.actor} rejected a frame[/]: {data.get('error')}")

    def _on_message(self, actor: str, data: dict[str, Any]) -> None:
        body = data["body"]
        if data["type"] == "Metrics":
            self._on_metrics(actor, body["step"], body["values"])
        elif data["type"] == "ErrorReport":
            self.view.note(f"[red]{actor}[/]: {body.get('error')}")

    def _on_metrics(self, actor: str, step: int, values: dict[str, float]) -> None:
        row = {"step": step, "source": actor, "time_s": round(time.time() - self.started + self.clock_offset, 3), **values}
        self.metrics.append(row)
        with open(self.run_dir / "metrics.jsonl", "a") as stream:
            stream.write(json.dumps(row) + "\n")

    # --- the end --------------------------------------------------------------------------
    def _finish(self, started: float) -> RunResult:
        wall = time.time() - started
        ok = not self.failure
        reason = self.failure or self.finish_reason or "stopped"
        summary = {"run": self.config.run.name, "ok": ok, "reason": reason, "wall_s": round(wall, 3),
                   **run_files.metrics_summary(self.run_dir), **self.summary, "actors": self.stats}
        if self.resumed_from:
            summary["resumed_from"] = self.resumed_from
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        run_files.write_report(self.run_dir, self.log)
        (self.log.info if ok else self.log.error)("run_ended", ok=ok, reason=reason, wall_s=round(wall, 2))
        logging_setup.close()
        return RunResult(self.run_dir, ok, reason, wall, self.stats, self.metrics,
                         interrupted=self.failure == INTERRUPTED)


