"""Bench tables printed to a file or a pipe keep every column whole."""

from __future__ import annotations

import io

from rich.table import Table

from respec.bench import console as bench_console


def test_a_table_printed_to_a_file_is_not_cut_to_80_columns(monkeypatch):
    table = Table(title="respec bench e2e")
    titles = [f"column title {i:>7}" for i in range(8)]  # 8 x 23 characters a row: cut at 80, whole at 250
    for title in titles:
        table.add_column(title, no_wrap=True)
    table.add_row(*[f"0.159 / 0.033 / {i:>5}" for i in range(8)])
    monkeypatch.setattr(bench_console.sys.stdout, "isatty", lambda: False)
    console = bench_console.table_console()
    console.file = io.StringIO()
    console.print(table)
    printed = console.file.getvalue()
    assert console.width == bench_console.FILE_WIDTH
    assert "…" not in printed and all(f"0.159 / 0.033 / {i:>5}" in printed for i in range(8))
