"""structlog set-up: JSON lines in the run's log.jsonl, pretty lines on a terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import structlog


def configure(log_file: Path | None = None, console: bool = True, process: str = "main") -> Any:
    """Configure this process's logging; returns a bound logger.

    JSON events go to `log_file` (appended: every process of a run shares the file, one
    event per line). On a terminal, events also print in colour; elsewhere only warnings
    and errors reach stderr.
    """
    close()
    sinks: list[tuple[TextIO, Any, int]] = []
    if log_file is not None:
        stream = open(log_file, "a", buffering=1)  # noqa: SIM115 - closed by close() or the next configure
        _open_files.append(stream)
        sinks.append((stream, structlog.processors.JSONRenderer(), 0))
    if console:
        tty = sys.stderr.isatty()
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
        sinks.append((sys.stderr, renderer, 0 if tty else 30))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _Fanout(sinks),
        ],
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(process=process)


_open_files: list[TextIO] = []


def close() -> None:
    """Close the log files this process opened (the launcher calls it when a run ends)."""
    while _open_files:
        _open_files.pop().close()


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _Fanout:
    """Final processor: render the event once per sink at or above that sink's level."""

    def __init__(self, sinks: list[tuple[TextIO, Any, int]]) -> None:
        self.sinks = sinks

    def __call__(self, logger: Any, method: str, event: dict) -> str:
        level = _LEVELS.get(event.get("level", "info"), 20)
        for stream, renderer, threshold in self.sinks:
            if level >= threshold and not stream.closed:
                stream.write(renderer(logger, method, dict(event)) + "\n")
        raise structlog.DropEvent
