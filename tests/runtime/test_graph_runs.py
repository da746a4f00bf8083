"""Whole graphs run by the launcher: across processes, under back-pressure, through crashes."""

from __future__ import annotations

import json

import pytest

from respec.runtime.trace import envelope_of, read_trace
from respec.runtime.trace_report import summarize

ACTORS = "tests.runtime.graph_actors"


def metric(result, key: str) -> float:
    return next(row[key] for row in result.metrics if key in row)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_demo_graph_runs_across_two_processes(run_graph, transport):
    result = run_graph({
        "ticker": {"class": "respec.actors.demo.ticker.Ticker", "params": {"count": 500}},
        "worker": {"class": "respec.actors.demo.power.Squarer", "replicas": 2, "group": "workers"},
        "collector": {"class": "respec.actors.demo.collector.Collector", "params": {"expected": 500}},
    }, name=f"demo_{transport}", transport=transport)
    assert result.ok, result.reason
    assert metric(result, "received") == 500
    assert metric(result, "workers") == 2  # both replicas, in the other process, took work
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["actors"]["collector/0"]["handled"] == 500
    assert (result.run_dir / "config.yaml").exists() and (result.run_dir / "log.jsonl").exists()
    trace = summarize(result.run_dir)
    assert trace.lost_ids == []  # every message sent was received


def test_100k_messages_through_a_slow_consumer_arrive_once_and_in_order(run_graph):
    result = run_graph({
        "sender": {"class": f"{ACTORS}.NumberedSender", "replicas": 2, "params": {"count": 50_000}},
        "receiver": {"class": f"{ACTORS}.SlowOrderedReceiver", "group": "sink",
                     "params": {"expected": 100_000, "pause_every": 20_000, "pause_s": 0.3}},
    }, name="backpressure", hwm=100, trace={"enabled": False})
    assert result.ok, result.reason
    assert metric(result, "received") == 100_000 and metric(result, "senders") == 2
    waits = sum(row["send_waits"] for name, row in result.stats.items() if name.startswith("sender"))
    assert waits > 0  # the senders really met the high-water mark and were slowed down
    assert result.stats["receiver/0"]["restarts"] == 0  # an order violation would have crashed it


def test_crashing_actor_is_restarted_and_the_crash_is_traced_and_logged(run_graph):
    result = run_graph({
        "ticker": {"class": "respec.actors.demo.ticker.Ticker",
                   "params": {"count": 20, "payload_size": 0, "interval_s": 0.01}},
        "crasher": {"class": f"{ACTORS}.CrashOnce", "group": "other",
                    "params": {"crash_on": 5, "expected": 20},
                    "restart": {"max_restarts": 2, "backoff_s": 0.05}},
    }, name="crash")
    assert result.ok, result.reason
    assert result.stats["crasher/0"]["restarts"] == 1
    assert metric(result, "handled_after_restart") == 14  # a fresh instance after seq 5
    records = read_trace(result.run_dir)
    crash = next(r for r in records if r.event == "crash")
    assert "ZeroDivisionError: deliberate crash on tick 5" in crash.detail
    assert envelope_of(crash).correlation_id == "tick-5"  # which message it was handling
    assert any(r.event == "restart" and r.actor == "crasher/0" for r in records)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    crashed = [e for e in log if e["event"] == "actor_crashed"]
    assert crashed and "deliberate crash" in crashed[0]["error"] and crashed[0]["traceback"]
    ticks = next(m for m in summarize(result.run_dir).messages if m.type == "Tick")
    assert ticks.crashed_ids and not ticks.lost_ids  # the crashed one is accounted for


def test_actor_that_keeps_crashing_gives_up_and_the_run_fails_with_the_reason(run_graph):
    result = run_graph({
        "ticker": {"class": "respec.actors.demo.ticker.Ticker", "params": {"count": 50, "payload_size": 0}},
        "crasher": {"class": f"{ACTORS}.CrashOnce", "params": {"always": True},
                    "restart": {"max_restarts": 2, "backoff_s": 0.01}},
    }, name="gives_up")
    assert not result.ok and result.exit_code != 0
    assert "crasher/0 gave up after 2 restarts" in result.reason
    assert "ZeroDivisionError" in result.reason


def test_failing_request_handler_gives_the_requester_a_remote_error(run_graph):
    result = run_graph({
        "probe": {"class": f"{ACTORS}.RemoteErrorProbe", "params": {"count": 6}},
        "echo": {"class": f"{ACTORS}.FailingEcho", "group": "server",
                 "restart": {"max_restarts": 10, "backoff_s": 0.0}},
    }, name="remote_error")
    assert result.ok, result.reason
    assert metric(result, "ok") == 3 and metric(result, "errors") == 3


def test_broadcast_reaches_every_subscriber_in_order(run_graph):
    result = run_graph({
        "trainer": {"class": f"{ACTORS}.WeightsPublisher", "params": {"count": 200}},
        "near": {"class": f"{ACTORS}.WeightsSubscriber", "params": {"count": 200}},
        "far": {"class": f"{ACTORS}.WeightsSubscriber", "group": "other", "replicas": 2,
                "params": {"count": 200}},
        "sink": {"class": f"{ACTORS}.Sink", "params": {"expected": 3}},
    }, name="broadcast", hwm=10)
    assert result.ok, result.reason
    assert result.stats["sink/0"]["handled"] == 3  # all three subscribers saw all 200 versions


def test_bad_frames_are_rejected_with_clear_errors_and_the_receiver_keeps_serving(run_graph):
    result = run_graph({
        "sender": {"class": f"{ACTORS}.GarbageSender", "params": {"valid": 10}},
        "receiver": {"class": f"{ACTORS}.TickCounter", "group": "other", "params": {"expected": 10}},
    }, name="garbage")
    assert result.ok, result.reason
    assert metric(result, "ticks") == 10  # every valid message after the garbage was handled
    assert result.stats["receiver/0"]["rejected"] == 5
    assert result.stats["receiver/0"]["restarts"] == 0  # a bad frame is not a crash
    rejects = [r.detail for r in read_trace(result.run_dir) if r.event == "reject"]
    assert len(rejects) == 5
    assert any("too short" in d for d in rejects)
    assert any("array frame 0 missing" in d for d in rejects)
    assert any("Expected `int`, got `str` - at `$.seq`" in d for d in rejects)
    log = (result.run_dir / "log.jsonl").read_text()
    assert log.count('"frame_rejected"') == 5


def test_optional_outputs_are_skipped_when_nobody_consumes_them(run_graph):
    result = run_graph({
        "sender": {"class": f"{ACTORS}.OptionalSender", "params": {"count": 10}},
        "receiver": {"class": f"{ACTORS}.TickCounter", "params": {"expected": 10}},
    }, name="optional")
    assert result.ok, result.reason
    assert result.stats["sender/0"]["sent"] == 10  # the Ticks; the optional Worked went nowhere


def test_threads_per_group_reaches_every_group_process(run_graph):
    result = run_graph({"reporter": {"class": f"{ACTORS}.ThreadsReporter", "group": "other"}},
                       name="threads", threads_per_group=1)
    assert result.ok, result.reason
    assert metric(result, "omp_threads") == 1
