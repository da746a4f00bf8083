"""The live view of a run: one row per actor instance, updated from the groups' stats."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class ProgressView:
    """A rich Live table on a terminal; silent (the log has it all) elsewhere."""

    def __init__(self, run_name: str, enabled: bool = True) -> None:
        self.run_name = run_name
        self.console = Console(stderr=True)
        self.enabled = enabled and sys.stderr.isatty()
        self.stats: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, tuple[int, int, str]] = {}
        self.notes: list[str] = []
        self.started = time.time()
        self._last: dict[str, tuple[float, int]] = {}  # instance -> (time, handled) last seen
        self._rates: dict[str, float] = {}
        self._live = Live(console=self.console, refresh_per_second=4, transient=False) if self.enabled else None

    def __enter__(self) -> ProgressView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def update_stats(self, stats: dict[str, dict[str, Any]]) -> None:
        """Stats arrive per group, at each group's own pace: rates are per instance."""
        now = time.time()
        for instance, row in stats.items():
            last_time, handled = self._last.get(instance, (self.started, 0))
            if now > last_time:
                self._rates[instance] = (row["handled"] - handled) / (now - last_time)
            self._last[instance] = (now, row["handled"])
        self.stats.update(stats)
        self._refresh()

    def update_progress(self, actor: str, done: int, total: int, label: str) -> None:
        self.progress[actor] = (done, total, label)
        self._refresh()

    def note(self, text: str) -> None:
        self.notes = [*self.notes[-4:], text]
        if self._live is None and sys.stderr.isatty():  # no live table: print the note itself
            self.console.print(Text.from_markup(text))
        self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        table = Table(title=f"respec run {self.run_name}  ({time.time() - self.started:.1f}s)")
        for column in ("actor", "handled", "msg/s", "sent", "restarts", "progress"):
            table.add_column(column, justify="left" if column in ("actor", "progress") else "right")
        for instance in sorted(self.stats):
            row = self.stats[instance]
            done, total, label = self.progress.get(instance, (0, 0, ""))
            bar = _bar(done, total, label) if total else ""
            table.add_row(instance, str(row["handled"]), f"{self._rates.get(instance, 0.0):.0f}",
                          str(row["sent"]), str(row["restarts"]), bar)
        return Group(table, *(Text.from_markup(n) for n in self.notes))


def _bar(done: int, total: int, label: str, width: int = 20) -> str:
    filled = int(width * min(done, total) / total)
    return f"{'█' * filled}{'░' * (width - filled)} {done}/{total} {label}"
