"""The run file: a YAML graph of actors, parsed into typed structs before anything starts.

Every error names the file, the key path and what was expected, e.g.
`configs/demo.yaml: actors.sink.replicas: Expected `int`, got `str``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml


class ConfigError(ValueError):
    """A run file that cannot run; the message names the file, the key and the problem."""


class _RunFileLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: `1.0e-5`.
    `lr: 1e-5` would load as the string "1e-5" and fail the type check. Everyone writes
    1e-5 (YAML 1.2 reads it as a float), so this loader does too."""


_RunFileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML as run files and --set values are read: safe, with 1e-5 a float."""
    return yaml.load(text, Loader=_RunFileLoader)  # noqa: S506 (a SafeLoader)


class RestartPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the supervisor treats an actor that raises."""

    max_restarts: int = 3  # restarts allowed before the actor gives up and the run stops
    backoff_s: float = 0.1  # wait before the first restart, doubled after each one
    backoff_max_s: float = 5.0


class ActorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One actor of the graph; its key in `actors:` is its name."""

    cls: str = msgspec.field(name="class")  # import path "package.module.ClassName"
    replicas: int = 1  # instances sharing the actor's work queue
    group: str = "main"  # process group: actors of one group share a process (inproc)
    params: dict[str, Any] = {}  # checked against the class's Params struct
    restart: RestartPolicy = RestartPolicy()


class TraceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    payload: bool = False  # also store each message body (arrays as shapes only)


class RunSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    seed: int = 0  # every actor whose Params have a `seed` and whose params do not set it gets this one
    runs_dir: str = "runs"
    placement: Literal["local", "ray"] = "local"  # processes here, or Ray actors (see `ray:`)
    transport: Literal["ipc", "tcp"] = "ipc"  # between process groups
    host: str = "127.0.0.1"  # tcp bind address
    hwm: int = 1000  # high-water mark of every socket, in messages
    timeout_s: float = 0.0  # stop the run with an error after this long (0: never)
    stop_after_s: float = 0.0  # end the run normally after this long (0: when an actor ends it)
    startup_timeout_s: float = 60.0
    group_restarts: int = 2  # times a process group that died (SIGKILL, OOM) is started again
    # threads for torch (OMP/MKL) in each group's process; 0 leaves the default. Several
    # groups on a small machine each taking every core slow each other down badly.
    threads_per_group: int = 0
    # how weight updates travel (docs/RUNTIME.md "Weights across devices"): auto = local in
    # one process, cuda_ipc between processes of one host when both sides are on CUDA, else file
    weights: Literal["auto", "local", "file", "cuda_ipc", "collective"] = "auto"
    weights_keep: int = 3  # cuda_ipc: versions the publisher keeps mapped for slow receivers
    trace: TraceSpec = TraceSpec()


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str = ""  # local Hugging Face checkpoint directory of the policy
    draft_path: str = ""  # local drafter checkpoint directory
    dtype: str = "float32"
    device: str = "cpu"


class GroupResources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What Ray reserves for one process group (one bundle of the run's placement group)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


class RaySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`placement: ray` (respec/runtime/ray_placement.py)."""

    address: str = ""  # an existing cluster ("auto", "HOST:6379"); "" starts a local instance
    num_cpus: int = 0  # CPUs of a local instance (0: Ray's default, every core)
    groups: dict[str, GroupResources] = {}  # per process group; a group not named gets 1 CPU
    namespace: str = "respec"  # where the run's address book is a named actor


class GraphConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    run: RunSpec
    actors: dict[str, ActorSpec]
    model: ModelSpec = ModelSpec()
    ray: RaySpec = RaySpec()


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> GraphConfig:
    """Read and type-check a run file; structural errors only (see validate.py for the rest)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such run file")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return parse_config(raw, str(path))


SHARED_KEY = "shared"  # a top-level block for YAML anchors (&name) the actors reuse; not part of the graph


def parse_config(raw: dict[str, Any], source: str = "<config>") -> GraphConfig:
    raw = {key: value for key, value in raw.items() if key != SHARED_KEY}
    actors = raw.get("actors")
    if isinstance(actors, dict):  # one by one, so that errors name the actor, not `[...]`
        for name, spec in actors.items():
            _convert(spec, ActorSpec, source, f"actors.{name}")
    config = _convert(raw, GraphConfig, source, "")
    _check_names(config, source)
    return config


def _convert(raw: Any, kind: type, source: str, prefix: str) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as error:
        where = readable_error(str(error))
        if prefix:
            where = f"{prefix}.{where}" if ": " in where else f"{prefix}: {where}"
            where = where.replace(f"{prefix}.: ", f"{prefix}: ")
        raise ConfigError(f"{source}: {where}") from None


def _check_names(config: GraphConfig, source: str) -> None:
    if not _NAME.match(config.run.name):
        raise ConfigError(f"{source}: run.name: {config.run.name!r} must be a plain name")
    if not config.actors:
        raise ConfigError(f"{source}: actors: the graph has no actors")
    for name, spec in config.actors.items():
        if not _NAME.match(name):
            raise ConfigError(f"{source}: actors.{name}: actor names are plain names")
        if spec.replicas < 1:
            raise ConfigError(f"{source}: actors.{name}.replicas: must be >= 1")
        if not _NAME.match(spec.group):
            raise ConfigError(f"{source}: actors.{name}.group: {spec.group!r} is not a plain name")
        if spec.restart.max_restarts < 0 or spec.restart.backoff_s < 0:
            raise ConfigError(f"{source}: actors.{name}.restart: values must be >= 0")
    _check_placement(config, source)
    _check_weights(config, source)


def _check_weights(config: GraphConfig, source: str) -> None:
    run = config.run
    if run.weights_keep < 1:
        raise ConfigError(f"{source}: run.weights_keep: must be >= 1")
    if run.weights != "cuda_ipc":
        return
    if not config.model.device.startswith("cuda"):
        raise ConfigError(f"{source}: run.weights: cuda_ipc needs model.device cuda (got {config.model.device!r}); "
                          "use auto, file or collective (gloo) on the CPU")
    if run.placement == "ray":
        raise ConfigError(f"{source}: run.weights: cuda_ipc needs every process on one host (placement: local); "
                          "use collective or file with placement: ray")


def _check_placement(config: GraphConfig, source: str) -> None:
    if config.run.placement != "ray":
        return
    if config.run.transport != "tcp":  # groups may sit on different hosts
        raise ConfigError(f"{source}: run.transport: placement: ray needs transport: tcp")
    groups = {spec.group for spec in config.actors.values()}
    for group, resources in config.ray.groups.items():
        if group not in groups:
            raise ConfigError(f"{source}: ray.groups.{group}: no actor is in process group {group!r}")
        if resources.num_cpus < 0 or resources.num_gpus < 0 or resources.num_cpus + resources.num_gpus == 0:
            raise ConfigError(f"{source}: ray.groups.{group}: num_cpus/num_gpus must be >= 0, not both 0")


def readable_error(message: str) -> str:
    """msgspec says 'Problem - at `$.a.b`'; we say 'a.b: Problem'."""
    match = re.match(r"^(.*?)(?: - at `\$\.?(.*)`)?$", message)
    problem, where = match.group(1), match.group(2) or ""
    where = re.sub(r"\[(\d+)\]", r".\1", where)
    unknown = re.match(r"^Object contains unknown field `(.*)`$", problem)
    if unknown:
        problem = f"unknown key {unknown.group(1)!r}"
        where = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
    missing = re.match(r"^Object missing required field `(.*)`$", problem)
    if missing:
        problem = "required key is missing"
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return f"{where}: {problem}" if where else problem


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key; None (``--set actors.scheduler=null``) removes it, e.g. an actor."""
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def config_to_yaml(config: GraphConfig) -> str:
    return yaml.safe_dump(msgspec.to_builtins(config), sort_keys=False)
