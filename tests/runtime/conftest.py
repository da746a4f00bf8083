from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from respec.runtime.launcher import RunResult, run_file


@pytest.fixture
def run_graph(tmp_path: Path):
    """Write a run file into tmp_path and run it; returns the RunResult."""

    def run(actors: dict[str, Any], name: str = "t", **run_keys: Any) -> RunResult:
        config = {"run": {"name": name, "runs_dir": str(tmp_path / "runs"), "timeout_s": 120,
                          **run_keys}, "actors": actors}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return run_file(path, progress=False)

    return run

