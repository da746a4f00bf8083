"""The actor runtime: actors, supervision, transport, graphs, traces."""

from respec.runtime.actor import Actor, NoParams, handles
from respec.runtime.context import RemoteError
from respec.runtime.graph import ConfigError, GraphConfig, load_config

__all__ = ["Actor", "ConfigError", "GraphConfig", "NoParams", "RemoteError", "handles", "load_config"]
