"""The `respec` command: exit codes and messages a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def respec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "respec", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=None)


def test_run_trace_and_chrome_export(tmp_path):
    config = ROOT / "configs" / "demo.yaml"
    done = respec("run", str(config), "--name", "cli_demo", "--set", f"run.runs_dir={tmp_path}",
                  "--set", "actors.ticker.params.count=300", "--set", "actors.collector.params.expected=300",
                  cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "ok: collector/0: collected all 300 results" in done.stderr
    run_dir = tmp_path / "cli_demo"
    shown = respec("trace", str(run_dir), "--chrome", str(tmp_path / "t.json"),
                   "--json", str(tmp_path / "s.json"), cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert "Tick" in shown.stdout and "collector/0" in shown.stdout
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e["name"] == "Worked" for e in events) == 300
    assert json.loads((tmp_path / "s.json").read_text())["lost_ids"] == []


def test_bad_config_exits_2_with_the_reason(tmp_path):
    config = ROOT / "configs" / "demo.yaml"
    done = respec("run", str(config), "--set", "actors.worker.replicas=zero", cwd=ROOT)
    assert done.returncode == 2
    assert "actors.worker.replicas: Expected `int`, got `str`" in done.stderr


def test_failed_run_exits_non_zero_with_the_reason(tmp_path):
    (tmp_path / "crash.yaml").write_text(f"""
run: {{name: crash, runs_dir: {tmp_path}}}
actors:
  ticker: {{class: respec.actors.demo.ticker.Ticker, params: {{count: 50, payload_size: 0}}}}
  crasher:
    class: tests.runtime.graph_actors.CrashOnce
    params: {{always: true}}
    restart: {{max_restarts: 1, backoff_s: 0}}
""")
    done = respec("run", str(tmp_path / "crash.yaml"), cwd=ROOT)
    assert done.returncode == 1
    assert "crasher/0 gave up after 1 restarts" in done.stderr


def test_trace_of_a_directory_without_trace_files(tmp_path):
    done = respec("trace", str(tmp_path), cwd=ROOT)
    assert done.returncode == 2 and "error:" in done.stderr


@pytest.mark.parametrize("started_ignoring_sigint", [False, True])
def test_ctrl_c_stops_every_group_cleanly(tmp_path, started_ignoring_sigint):
    """Also when started as a shell script's background job, which inherits SIGINT ignored."""
    import signal
    import time

    config = ROOT / "configs" / "demo.yaml"
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if started_ignoring_sigint else None
    process = subprocess.Popen(
        [sys.executable, "-m", "respec", "run", str(config), "--name", "interrupted",
         "--set", f"run.runs_dir={tmp_path}", "--set", "actors.ticker.params.interval_s=0.01"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    summary = tmp_path / "interrupted" / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not summary.exists() or "group_started" not in summary.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted (Ctrl-C)" in stderr
    log = (tmp_path / "interrupted" / "log.jsonl").read_text()
    assert log.count('"group_exited"') == 2  # both groups shut down, none left behind
    assert json.loads((tmp_path / "interrupted" / "summary.json").read_text())["reason"] == "interrupted (Ctrl-C)"
