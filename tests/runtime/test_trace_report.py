"""trace_report: exact numbers from a synthetic run, a valid Chrome export, a rendered report.

The run is written with the real TraceWriter under a fake clock, so every time is known:

  group "gen":   generator/0 sends Rollouts #1..#5, broadcasts DraftWeights #6, requests
                 VerifyRequest #7 from verifier/0, which replies (VerifyResult); trainer/0
                 handles the ScoredRollout.
  group "score": scorer/0 and scorer/1 handle the Rollouts; #4 is never received (lost),
                 #5 crashes scorer/1, which restarts; scorer/0 rejects a bad frame and
                 sends one ScoredRollout from inside a handler. The file ends in a partial
                 record, as if the process was killed mid-write.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from rich.console import Console

from respec.messages import Envelope, Tick, encode
from respec.messages.codec import split_header
from respec.runtime import trace as trace_module
from respec.runtime.trace import TraceWriter
from respec.runtime.trace_report import print_summary, summarize, to_chrome, trace_command

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def at(self, offset_s: float) -> FakeClock:
        self.now = T0 + offset_s
        return self


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(trace_module, "time", types.SimpleNamespace(time=lambda: fake.now))
    return fake


def frames(message_id: str, kind: str, sender: str, sent_at_offset: float, **fields) -> list[bytes]:
    envelope = Envelope(1, message_id, kind, sender, T0 + sent_at_offset, **fields)
    return encode(envelope, Tick(seq=0))  # the real wire header; the body is not read


def rollout(n: int, sent_at: float) -> list[bytes]:
    return frames(f"generator/0#{n}", "Rollout", "generator/0", sent_at,
                  policy_version=3, draft_version=2, correlation_id=f"rollout-{n}")


@pytest.fixture
def run_dir(tmp_path: Path, clock: FakeClock) -> Path:
    gen = TraceWriter(tmp_path / "trace.gen.msgpack")
    score = TraceWriter(tmp_path / "trace.score.msgpack")
    clock.at(0.0)
    gen.event("start", "gen")
    score.event("start", "score")
    for n in range(1, 6):
        clock.at(float(n))
        gen.message("send", "generator/0", rollout(n, n))
    # recv t is the end of handling: latency = t - sent_at, handler time = handled_s
    clock.at(1.003)
    score.message("recv", "scorer/0", rollout(1, 1.0), handled_s=0.001)  # latency 3000 us
    clock.at(2.005)
    score.message("recv", "scorer/1", rollout(2, 2.0), handled_s=0.002)  # 5000 us
    clock.at(3.008)  # inside the handler of #3, which runs 3.006 .. 3.010
    scored = frames("scorer/0#1", "ScoredRollout", "scorer/0", 3.008)
    score.message("send", "scorer/0", scored)
    clock.at(3.010)
    score.message("recv", "scorer/0", rollout(3, 3.0), handled_s=0.004)  # 10000 us
    clock.at(3.5)
    gen.message("recv", "trainer/0", scored, handled_s=0.2)
    clock.at(5.001)
    score.event("crash", "scorer/1", "on_rollout: ZeroDivisionError: division by zero",
                bytes(split_header(rollout(5, 5.0)[0])[0]))
    clock.at(5.5)
    score.event("restart", "scorer/1", "restart 1 after 0.500s")
    clock.at(6.0)
    weights = frames("generator/0#6", "DraftWeights", "generator/0", 6.0, draft_version=3)
    gen.message("send", "generator/0", weights)
    clock.at(6.001)
    score.message("recv", "scorer/0", weights, handled_s=0.0005)  # 1000 us
    clock.at(6.003)
    score.message("recv", "scorer/1", weights, handled_s=0.001)  # 3000 us
    clock.at(7.0)
    score.event("reject", "scorer/0", "bad envelope: [/bold] truncated")  # not rich markup
    clock.at(8.0)
    request = frames("generator/0#7", "VerifyRequest", "generator/0", 8.0,
                     correlation_id="rollout-9")
    gen.message("send", "generator/0", request)
    clock.at(8.004)
    gen.message("recv", "verifier/0", request, handled_s=0.003)
    clock.at(8.0045)
    reply = frames("verifier/0#1", "VerifyResult", "verifier/0", 8.0045, reply_to="generator/0#7")
    gen.message("send", "verifier/0", reply)
    clock.at(8.005)
    gen.message("recv", "generator/0", reply)  # a reply: no handler runs, handled_s stays 0
    clock.at(10.0)
    gen.event("stop", "gen")
    score.event("stop", "score")
    gen.close()
    score.close()
    with open(tmp_path / "trace.score.msgpack", "ab") as file:
        file.write((500).to_bytes(4, "little") + b"\x93\xa4recv")  # killed mid-write
    return tmp_path


def actor(summary, instance: str):
    return next(a for a in summary.actors if a.instance == instance)


def message(summary, kind: str):
    return next(m for m in summary.messages if m.type == kind)


# --- summarize ----------------------------------------------------------------------------
def test_run_bounds_and_groups(run_dir):
    summary = summarize(run_dir)
    assert summary.groups == ["gen", "score"]
    assert summary.unstopped_groups == []
    assert summary.started_at == T0
    assert summary.stopped_at == T0 + 10.0
    assert summary.duration_s == pytest.approx(10.0)


def test_message_counts_latencies_and_the_lost_message(run_dir):
    summary = summarize(run_dir)
    rollouts = message(summary, "Rollout")
    assert (rollouts.sent, rollouts.received) == (5, 3)
    # latencies 3000, 5000, 10000 us; linear interpolation between ranks
    assert rollouts.latency_p50_us == pytest.approx(5000, abs=1)
    assert rollouts.latency_p90_us == pytest.approx(9000, abs=1)
    assert rollouts.latency_p99_us == pytest.approx(9900, abs=1)
    assert rollouts.lost_ids == ["generator/0#4"]
    assert rollouts.crashed_ids == ["generator/0#5"]
    assert summary.lost_ids == ["generator/0#4"]

    weights = message(summary, "DraftWeights")  # one broadcast, two subscribers
    assert (weights.sent, weights.received) == (1, 2)
    assert weights.latency_p50_us == pytest.approx(2000, abs=1)
    assert weights.lost_ids == []

    scored = message(summary, "ScoredRollout")  # across groups: sent by score, handled in gen
    assert (scored.sent, scored.received, scored.lost_ids) == (1, 1, [])
    assert scored.latency_p50_us == pytest.approx(492_000, abs=1)
    assert [m.type for m in summary.messages] == [
        "DraftWeights", "Rollout", "ScoredRollout", "VerifyRequest", "VerifyResult"]


def test_per_actor_counts_rates_and_handler_times(run_dir):
    summary = summarize(run_dir)
    scorer = actor(summary, "scorer/0")
    assert scorer.group == "score"
    assert scorer.received == {"DraftWeights": 1, "Rollout": 2}
    assert scorer.sent == {"ScoredRollout": 1}
    assert scorer.active_s == pytest.approx(10.0)  # its group's start .. stop
    assert scorer.rate_per_s == pytest.approx(0.3)
    # handler times 500, 1000, 4000 us
    assert scorer.handler_p50_us == pytest.approx(1000, abs=1)
    assert scorer.handler_p99_us == pytest.approx(1000 + 0.98 * 3000, abs=1)
    assert (scorer.crashes, scorer.restarts, scorer.rejects) == (0, 0, 1)

    generator = actor(summary, "generator/0")
    assert generator.sent == {"DraftWeights": 1, "Rollout": 5, "VerifyRequest": 1}
    assert generator.received == {"VerifyResult": 1}
    assert generator.handler_p50_us is None  # replies are not handler time
    verifier = actor(summary, "verifier/0")
    assert verifier.handler_p50_us == pytest.approx(3000, abs=1)
    assert [a.instance for a in summary.actors] == [
        "generator/0", "trainer/0", "verifier/0", "scorer/0", "scorer/1"]


def test_crash_restart_and_reject_are_listed(run_dir):
    summary = summarize(run_dir)
    crashed = actor(summary, "scorer/1")
    assert (crashed.crashes, crashed.restarts, crashed.rejects) == (1, 1, 0)
    kinds = [(i.kind, i.actor, i.message_id) for i in summary.incidents]
    assert kinds == [
        ("crash", "scorer/1", "generator/0#5"),
        ("restart", "scorer/1", ""),
        ("reject", "scorer/0", ""),
    ]
    crash = summary.incidents[0]
    assert crash.message_type == "Rollout"
    assert "ZeroDivisionError" in crash.detail
    assert crash.t == pytest.approx(T0 + 5.001)


def test_timeline_buckets_count_handled_messages(run_dir):
    summary = summarize(run_dir, buckets=40)  # 0.25 s per bucket
    scorer = actor(summary, "scorer/0")
    assert len(scorer.timeline) == 40
    assert {i: n for i, n in enumerate(scorer.timeline) if n} == {4: 1, 12: 1, 24: 1}
    assert sum(actor(summary, "scorer/1").timeline) == 2


def test_summary_is_json_serialisable(run_dir):
    data = json.loads(json.dumps(summarize(run_dir).to_dict(), allow_nan=False))
    assert data["lost_ids"] == ["generator/0#4"]
    assert data["actors"][0]["instance"] == "generator/0"


def test_a_killed_group_is_reported_unstopped(tmp_path, clock):
    writer = TraceWriter(tmp_path / "trace.solo.msgpack")
    clock.at(0.0)
    writer.event("start", "solo")
    clock.at(2.0)
    writer.message("send", "a/0", frames("a/0#1", "Tick", "a/0", 2.0))
    writer.close()
    summary = summarize(tmp_path)
    assert summary.unstopped_groups == ["solo"]
    assert summary.duration_s == pytest.approx(2.0)
    assert summary.lost_ids == ["a/0#1"]
    assert actor(summary, "a/0").rate_per_s == 0.0  # nothing received


# --- Chrome export ------------------------------------------------------------------------
def load_chrome(run_dir: Path, tmp_path: Path) -> list[dict]:
    out = to_chrome(run_dir, tmp_path / "out" / "trace.json")
    document = json.loads(out.read_text())
    return document["traceEvents"]


def test_chrome_events_have_numeric_fields(run_dir, tmp_path):
    events = load_chrome(run_dir, tmp_path)
    for event in events:
        for key in ("ts", "dur", "pid", "tid"):
            if key in event:
                assert type(event[key]) in (int, float), (key, event)
        assert event["ph"] in ("M", "X", "s", "f", "i")
        if event["ph"] != "M":
            assert event["ts"] >= 0


def test_chrome_metadata_names_groups_and_instances(run_dir, tmp_path):
    events = load_chrome(run_dir, tmp_path)
    processes = {e["args"]["name"]: e["pid"] for e in events if e["name"] == "process_name"}
    assert set(processes) == {"gen", "score"}
    threads = {e["args"]["name"]: (e["pid"], e["tid"])
               for e in events if e["name"] == "thread_name"}
    assert set(threads) == {"generator/0", "trainer/0", "verifier/0", "scorer/0", "scorer/1"}
    assert threads["scorer/0"][0] == threads["scorer/1"][0] == processes["score"]
    assert threads["verifier/0"][0] == processes["gen"]
    assert len({tid for _, tid in threads.values()}) == 5


def test_chrome_has_one_slice_per_handled_message(run_dir, tmp_path):
    events = load_chrome(run_dir, tmp_path)
    handled = [e for e in events if e["ph"] == "X" and not e["name"].startswith("send ")]
    assert len(handled) == 8
    third = next(e for e in handled if e["args"]["id"] == "generator/0#3")
    assert third["name"] == "Rollout"
    assert third["ts"] == pytest.approx(3_006_000, abs=1)
    assert third["dur"] == pytest.approx(4000, abs=1)
    assert third["args"]["correlation_id"] == "rollout-3"
    assert (third["args"]["policy_version"], third["args"]["draft_version"]) == (3, 2)
    sends = [e for e in events if e["ph"] == "X" and e["name"].startswith("send ")]
    assert len(sends) == 9 and all(e["dur"] == 0 for e in sends)


def test_chrome_flows_link_each_send_to_its_recv(run_dir, tmp_path):
    events = load_chrome(run_dir, tmp_path)
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(ends)
    # numeric ids: Perfetto drops a flow whose string id is not hex
    assert all(type(flow_id) is int for flow_id in starts)
    thread = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    linked = sorted(
        (ends[i]["args"]["message_id"], thread[starts[i]["tid"]], thread[ends[i]["tid"]])
        for i in starts
    )
    assert linked == [
        ("generator/0#1", "generator/0", "scorer/0"),
        ("generator/0#2", "generator/0", "scorer/1"),
        ("generator/0#3", "generator/0", "scorer/0"),
        ("generator/0#6", "generator/0", "scorer/0"),  # a broadcast: one flow per receiver
        ("generator/0#6", "generator/0", "scorer/1"),
        ("generator/0#7", "generator/0", "verifier/0"),
        ("scorer/0#1", "scorer/0", "trainer/0"),
        ("verifier/0#1", "verifier/0", "generator/0"),
    ]  # no flow for #4 (lost) nor #5 (crashed its handler)
    slices = {(e["cat"], e["pid"], e["tid"], e["ts"]) for e in events if e["ph"] == "X"}
    for flow in [*starts.values(), *ends.values()]:  # each end sits on a slice's start
        assert (flow["cat"], flow["pid"], flow["tid"], flow["ts"]) in slices
        assert starts[flow["id"]]["name"] == ends[flow["id"]]["name"]  # Perfetto keys on both
    assert all(e["bp"] == "e" for e in ends.values())
    first = next(i for i in starts if starts[i]["args"]["message_id"] == "generator/0#1")
    assert starts[first]["ts"] == pytest.approx(1_000_000, abs=1)
    assert ends[first]["ts"] == pytest.approx(1_002_000, abs=1)


def test_chrome_flows_come_after_every_slice(run_dir, tmp_path):
    # Perfetto binds a flow to a slice it has already read; at equal ts it keeps file order.
    phases = [e["ph"] for e in load_chrome(run_dir, tmp_path)]
    assert max(i for i, ph in enumerate(phases) if ph == "X") < phases.index("s")


def test_chrome_instants_for_crash_restart_reject(run_dir, tmp_path):
    events = load_chrome(run_dir, tmp_path)
    instants = {e["name"]: e for e in events if e["ph"] == "i" and e["s"] == "t"}
    assert set(instants) == {"crash", "restart", "reject"}
    assert instants["crash"]["args"]["message_id"] == "generator/0#5"
    assert instants["crash"]["ts"] == pytest.approx(5_001_000, abs=1)


# --- terminal report and CLI --------------------------------------------------------------
def test_print_summary_renders_tables_and_timeline(run_dir):
    console = Console(record=True, width=160)
    print_summary(summarize(run_dir), console)
    text = console.export_text()
    for expected in ("Actors", "Messages", "Timeline", "scorer/1", "Rollout",
                     "generator/0#4", "ZeroDivisionError", "bad envelope: [/bold] truncated"):
        assert expected in text
    scorer_line = next(line for line in text.splitlines() if "scorer/1" in line and "✖" in line)
    assert scorer_line.index("✖") < scorer_line.index("↻")  # crash bucket 20, restart 22


def test_trace_command_writes_chrome_and_json(run_dir, tmp_path):
    console = Console(record=True, width=160)
    chrome, summary_json = tmp_path / "c.json", tmp_path / "s.json"
    summary = trace_command(str(run_dir), str(chrome), str(summary_json), console=console)
    assert json.loads(summary_json.read_text()) == json.loads(json.dumps(summary.to_dict()))
    assert json.loads(chrome.read_text())["traceEvents"]
    assert "Lost" in console.export_text()


def test_trace_command_without_trace_files_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace files"):
        trace_command(str(tmp_path), None, None, console=Console(record=True))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trace_command(str(tmp_path / "missing"), None, None, console=Console(record=True))
