"""Reading a run's trace back: a summary, a terminal report and a Chrome/Perfetto export.

`summarize` turns the trace files of `runs/<name>/` into numbers (per actor instance,
per message type, lost messages, crashes); `print_summary` shows them as rich tables with
a sparkline timeline; `to_chrome` writes trace-event JSON that Perfetto and
chrome://tracing open; `trace_command` is what `respec trace RUN_DIR` runs.

Times in the trace are wall-clock seconds (`time.time()`); latencies are reported in
microseconds. A recv record is written after its handler returns, so its `t` is the end
of handling and `t - handled_s` the start.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from respec.messages import Envelope
from respec.runtime.trace import TraceRecord, envelope_of, read_trace_file

TIMELINE_BUCKETS = 40
INCIDENT_KINDS = ("crash", "restart", "gave_up", "reject")
GROUP_EVENTS = ("start", "stop")  # their `actor` is the process group, not an instance
_SPARK_LEVELS = "▁▂▃▄▅▆▇█"
_MARKS = {  # drawn over the sparkline bucket where the incident happened
    "gave_up": ("■", "bold red"),
    "crash": ("✖", "bold red"),
    "restart": ("↻", "yellow"),
    "reject": ("!", "magenta"),
}
_SEVERITY = {"reject": 0, "restart": 1, "crash": 2, "gave_up": 3}  # one bucket, one mark: worst


# --- the summary ------------------------------------------------------------------------
@dataclass
class Incident:
    """A crash, restart, gave_up or reject, with what the trace says about it."""

    kind: str
    t: float
    actor: str
    detail: str
    message_id: str = ""  # crash: the message whose handler failed
    message_type: str = ""


@dataclass
class ActorSummary:
    instance: str  # "<actor>/<replica>"
    group: str  # the process group whose trace file holds it
    sent: dict[str, int]  # by message type
    received: dict[str, int]  # by message type (replies to its requests included)
    active_s: float  # life of its process group (first to last record of that group's file)
    rate_per_s: float  # received / active_s
    handler_p50_us: float | None  # handler time; replies (no handler runs) left out
    handler_p99_us: float | None
    crashes: int
    restarts: int
    rejects: int
    gave_up: int
    incidents: list[Incident]
    timeline: list[int]  # messages handled per time bucket of the run

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    @property
    def received_total(self) -> int:
        return sum(self.received.values())


@dataclass
class MessageTypeSummary:
    type: str
    sent: int  # send records (a message pushed to two actors counts twice)
    received: int  # recv records (a broadcast counts once per subscriber)
    latency_p50_us: float | None  # recv t - sent_at
    latency_p90_us: float | None
    latency_p99_us: float | None
    lost_ids: list[str]  # sent, never received, no crash recorded: gone without a trace
    crashed_ids: list[str]  # sent, never received because the handler crashed on it


@dataclass
class TraceSummary:
    run_dir: str
    groups: list[str]
    unstopped_groups: list[str]  # no "stop" record: killed, or still running
    started_at: float  # unix seconds of the earliest event
    stopped_at: float  # unix seconds of the latest event
    duration_s: float
    actors: list[ActorSummary]
    messages: list[MessageTypeSummary]
    incidents: list[Incident]
    timeline_buckets: int
    lost_ids: list[str] = field(default_factory=list)  # all types': "nothing was lost" checks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- reading ----------------------------------------------------------------------------
@dataclass
class _Entry:
    """One record with the group whose file held it and its decoded envelope."""

    record: TraceRecord
    group: str
    envelope: Envelope | None

    @property
    def began(self) -> float:
        return self.record.t - self.record.handled_s

    @property
    def is_reply(self) -> bool:
        return self.envelope is not None and bool(self.envelope.reply_to)


def _trace_files(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    files = sorted(run_dir.glob("trace.*.msgpack"))
    if not files:
        raise FileNotFoundError(
            f"no trace files (trace.<group>.msgpack) in {run_dir}: is it a run directory "
            "(runs/<name>/), and was tracing on (run.trace.enabled)?"
        )
    return files


def _group_of(path: Path) -> str:
    return path.name.removeprefix("trace.").removesuffix(".msgpack")


def _safe_envelope(record: TraceRecord) -> Envelope | None:
    # One undecodable envelope should cost that record's details, not the whole report.
    try:
        return envelope_of(record)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _load(files: list[Path]) -> list[_Entry]:
    entries = [
        _Entry(record, _group_of(path), _safe_envelope(record))
        for path in files
        for record in read_trace_file(path)
    ]
    entries.sort(key=lambda entry: entry.record.t)
    return entries


def _run_bounds(entries: list[_Entry]) -> tuple[float, float]:
    if not entries:
        return 0.0, 0.0
    return min(entry.began for entry in entries), max(entry.record.t for entry in entries)


# --- numbers ----------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _bucket_of(t: float, start: float, duration: float, buckets: int) -> int:
    if duration <= 0:
        return 0
    return min(max(int((t - start) / duration * buckets), 0), buckets - 1)


def _incident(entry: _Entry) -> Incident:
    envelope = entry.envelope
    return Incident(
        kind=entry.record.event, t=entry.record.t, actor=entry.record.actor,
        detail=entry.record.detail,
        message_id=envelope.id if envelope else "", message_type=envelope.type if envelope else "",
    )


def _actor_summary(
    instance: str, entries: list[_Entry], active_s: float,
    start: float, duration: float, buckets: int,
) -> ActorSummary:
    sends = [e for e in entries if e.record.event == "send" and e.envelope]
    recvs = [e for e in entries if e.record.event == "recv" and e.envelope]
    incidents = [_incident(e) for e in entries if e.record.event in INCIDENT_KINDS]
    kinds = Counter(incident.kind for incident in incidents)
    handler_us = [e.record.handled_s * 1e6 for e in recvs if not e.is_reply]
    timeline = [0] * buckets
    for entry in recvs:
        timeline[_bucket_of(entry.record.t, start, duration, buckets)] += 1
    return ActorSummary(
        instance=instance, group=entries[0].group,
        sent=dict(sorted(Counter(e.envelope.type for e in sends).items())),
        received=dict(sorted(Counter(e.envelope.type for e in recvs).items())),
        active_s=active_s, rate_per_s=len(recvs) / active_s if active_s > 0 else 0.0,
        handler_p50_us=_percentile(handler_us, 0.50), handler_p99_us=_percentile(handler_us, 0.99),
        crashes=kinds["crash"], restarts=kinds["restart"], rejects=kinds["reject"],
        gave_up=kinds["gave_up"], incidents=incidents, timeline=timeline,
    )


def _message_summaries(entries: list[_Entry]) -> list[MessageTypeSummary]:
    sent: dict[str, list[str]] = defaultdict(list)  # type -> ids, in send order
    received: dict[str, list[float]] = defaultdict(list)  # type -> latencies (us)
    received_ids: set[str] = set()
    crashed_ids: set[str] = set()
    for entry in entries:
        envelope, event = entry.envelope, entry.record.event
        if envelope is None:
            continue
        if event == "send":
            sent[envelope.type].append(envelope.id)
        elif event == "recv":
            received[envelope.type].append((entry.record.t - envelope.sent_at) * 1e6)
            received_ids.add(envelope.id)
        elif event == "crash":
            crashed_ids.add(envelope.id)
    summaries = []
    for kind in sorted(sent.keys() | received.keys()):
        unreceived = [i for i in dict.fromkeys(sent[kind]) if i not in received_ids]
        latencies = received[kind]
        summaries.append(MessageTypeSummary(
            type=kind, sent=len(sent[kind]), received=len(latencies),
            latency_p50_us=_percentile(latencies, 0.50),
            latency_p90_us=_percentile(latencies, 0.90),
            latency_p99_us=_percentile(latencies, 0.99),
            lost_ids=[i for i in unreceived if i not in crashed_ids],
            crashed_ids=[i for i in unreceived if i in crashed_ids],
        ))
    return summaries


def _group_lifetimes(entries: list[_Entry]) -> dict[str, float]:
    bounds: dict[str, list[float]] = {}
    for entry in entries:
        low, high = bounds.setdefault(entry.group, [entry.began, entry.record.t])
        bounds[entry.group] = [min(low, entry.began), max(high, entry.record.t)]
    return {group: high - low for group, (low, high) in bounds.items()}


def summarize(run_dir: str | Path, buckets: int = TIMELINE_BUCKETS) -> TraceSummary:
    """Per-actor and per-message-type numbers of a run, from its trace files.

    Raises FileNotFoundError when `run_dir` has no trace files.
    """
    files = _trace_files(Path(run_dir))
    entries = _load(files)
    start, stop = _run_bounds(entries)
    duration = stop - start
    lifetimes = _group_lifetimes(entries)
    by_instance: dict[str, list[_Entry]] = defaultdict(list)
    for entry in entries:
        if entry.record.event not in GROUP_EVENTS:
            by_instance[entry.record.actor].append(entry)
    # Active time is the process's life, not the instance's first-to-last event: an actor
    # that handled two messages 1 ms apart did not run at 1000/s.
    actors = [
        _actor_summary(instance, own, lifetimes[own[0].group], start, duration, buckets)
        for instance, own in by_instance.items()
    ]
    actors.sort(key=lambda actor: (actor.group, actor.instance))
    messages = _message_summaries(entries)
    stopped = {e.group for e in entries if e.record.event == "stop"}
    groups = sorted(_group_of(path) for path in files)
    return TraceSummary(
        run_dir=str(run_dir), groups=groups,
        unstopped_groups=[group for group in groups if group not in stopped],
        started_at=start, stopped_at=stop, duration_s=duration,
        actors=actors, messages=messages,
        incidents=[_incident(e) for e in entries if e.record.event in INCIDENT_KINDS],
        timeline_buckets=buckets,
        lost_ids=[i for message in messages for i in message.lost_ids],
    )


# --- terminal report --------------------------------------------------------------------
def _format_us(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 1e3:
        return f"{value:.0f} µs"
    if abs(value) < 1e6:
        return f"{value / 1e3:.2f} ms"
    return f"{value / 1e6:.2f} s"


def _by_type(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in counts.items()) or "-"


def _actor_table(summary: TraceSummary) -> Table:
    table = Table(title="Actors", title_justify="left")
    for column in ("group", "instance", "received", "sent"):
        table.add_column(column)
    for column in ("rate/s", "handler p50", "handler p99", "crash", "restart", "reject"):
        table.add_column(column, justify="right")
    for actor in summary.actors:
        table.add_row(
            Text(actor.group), Text(actor.instance),
            Text(f"{actor.received_total} ({_by_type(actor.received)})"),
            Text(f"{actor.sent_total} ({_by_type(actor.sent)})"),
            f"{actor.rate_per_s:.1f}",
            _format_us(actor.handler_p50_us), _format_us(actor.handler_p99_us),
            str(actor.crashes + actor.gave_up), str(actor.restarts), str(actor.rejects),
        )
    return table


def _message_table(summary: TraceSummary) -> Table:
    table = Table(title="Messages (latency: recv end - sent_at)", title_justify="left")
    for column in ("type", "sent", "received", "lost", "crashed", "p50", "p90", "p99"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for message in summary.messages:
        lost = str(len(message.lost_ids))
        table.add_row(
            Text(message.type), str(message.sent), str(message.received),
            Text(lost, style="bold red") if message.lost_ids else lost,
            str(len(message.crashed_ids)),
            _format_us(message.latency_p50_us), _format_us(message.latency_p90_us),
            _format_us(message.latency_p99_us),
        )
    return table


def _incident_table(summary: TraceSummary) -> Table:
    table = Table(title="Crashes, restarts, rejects", title_justify="left")
    for column in ("at", "kind", "actor", "message", "detail"):
        table.add_column(column, justify="right" if column == "at" else "left")
    for incident in summary.incidents:
        style = _MARKS[incident.kind][1]
        message = f"{incident.message_type} {incident.message_id}".strip()
        table.add_row(  # Text, not str: a detail like "KeyError: '[/x]'" is not markup
            f"{incident.t - summary.started_at:.3f}s", Text(incident.kind, style=style),
            Text(incident.actor), Text(message or "-"), Text(incident.detail),
        )
    return table


def _sparkline(actor: ActorSummary, summary: TraceSummary) -> Text:
    peak = max(actor.timeline, default=0)
    cells = [
        (_SPARK_LEVELS[(count * len(_SPARK_LEVELS) - 1) // peak], "green") if count else (" ", "")
        for count in actor.timeline
    ]
    marked: dict[int, str] = {}
    for incident in actor.incidents:
        bucket = _bucket_of(incident.t, summary.started_at, summary.duration_s, len(cells))
        if bucket not in marked or _SEVERITY[incident.kind] > _SEVERITY[marked[bucket]]:
            marked[bucket] = incident.kind
    for bucket, kind in marked.items():
        cells[bucket] = _MARKS[kind]
    line = Text()
    for char, style in cells:
        line.append(char, style=style)
    return line


def _timeline_table(summary: TraceSummary) -> Table:
    title = f"Timeline: messages handled per {summary.duration_s / summary.timeline_buckets:.3g}s"
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption="✖ crash  ↻ restart  ! reject  ■ gave up")
    table.add_column("instance")
    table.add_column("handled")
    table.add_column("peak", justify="right")
    for actor in summary.actors:
        peak = str(max(actor.timeline, default=0))
        table.add_row(Text(actor.instance), _sparkline(actor, summary), peak)
    return table


def _lost_lines(summary: TraceSummary, shown: int = 20) -> Text:
    if not summary.lost_ids:
        return Text("No message lost: every message sent was received or crashed its handler.",
                    style="green")
    ids = ", ".join(summary.lost_ids[:shown])
    more = f" and {len(summary.lost_ids) - shown} more" if len(summary.lost_ids) > shown else ""
    count = len(summary.lost_ids)
    return Text(f"Lost ({count} sent, never received): {ids}{more}", style="bold red")


def _headline(summary: TraceSummary) -> Text:
    line = Text(summary.run_dir, style="bold")
    line.append(f": {len(summary.groups)} group(s) ({', '.join(summary.groups)}), "
                f"{summary.duration_s:.3f}s")
    if summary.unstopped_groups:
        line.append(f"; no stop record from {', '.join(summary.unstopped_groups)} (killed?)",
                    style="yellow")
    return line


def print_summary(summary: TraceSummary, console: Console) -> None:
    console.print(_headline(summary))
    console.print(_actor_table(summary))
    console.print(_message_table(summary))
    console.print(_lost_lines(summary))
    if summary.incidents:
        console.print(_incident_table(summary))
    console.print(_timeline_table(summary))


# --- Chrome / Perfetto export -------------------------------------------------------------
class _Ids:
    """Numeric pids (one per group) and tids (one per actor instance) with their names."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.tids: dict[str, tuple[int, int]] = {}  # instance -> (pid, tid)

    def pid(self, group: str) -> int:
        return self.pids.setdefault(group, len(self.pids) + 1)

    def thread(self, entry: _Entry) -> tuple[int, int]:
        pid = self.pid(entry.group)
        if entry.record.event in GROUP_EVENTS:
            return pid, 0
        return self.tids.setdefault(entry.record.actor, (pid, len(self.tids) + 1))

    def metadata(self) -> list[dict[str, Any]]:
        events = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                   "args": {"name": group}}
                  for group, pid in self.pids.items()]
        events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                    "args": {"name": instance}}
                   for instance, (pid, tid) in self.tids.items()]
        return events


def _us(t: float, origin: float) -> float:
    return round((t - origin) * 1e6, 3)


def _message_args(envelope: Envelope) -> dict[str, Any]:
    args: dict[str, Any] = {
        "id": envelope.id, "sender": envelope.sender, "correlation_id": envelope.correlation_id,
        "policy_version": envelope.policy_version, "draft_version": envelope.draft_version,
    }
    if envelope.reply_to:
        args["reply_to"] = envelope.reply_to
    return args


def _flows(entries: list[_Entry]) -> dict[int, tuple[_Entry, int]]:
    """recv entry (by identity) -> (the send it came from, a numeric flow id).

    Numeric because Perfetto reads a string flow id as hex and drops any other (so an
    envelope id like "generator/0#3" would lose its arrow); the envelope id travels in
    the flow's args instead. One flow per receiver: a broadcast has several.
    """
    sends: dict[str, list[_Entry]] = defaultdict(list)
    for entry in entries:
        if entry.envelope is not None and entry.record.event == "send":
            sends[entry.envelope.id].append(entry)
    received: Counter[str] = Counter()
    flows: dict[int, tuple[_Entry, int]] = {}
    for entry in entries:
        if entry.envelope is None or entry.record.event != "recv":
            continue
        sent = sends.get(entry.envelope.id)
        if not sent:
            continue  # the sender's trace is missing: nothing to link from
        # n-th receiver pairs with the n-th send (pushes) or the only send (broadcast)
        n = received[entry.envelope.id]
        received[entry.envelope.id] += 1
        flows[id(entry)] = (sent[min(n, len(sent) - 1)], len(flows) + 1)
    return flows


def _message_events(entry: _Entry, pid: int, tid: int, origin: float) -> list[dict[str, Any]]:
    envelope, record = entry.envelope, entry.record
    assert envelope is not None
    if record.event == "send":
        # A zero-length slice so the flow arrow has something to start from outside handlers.
        return [{"ph": "X", "cat": "message", "name": f"send {envelope.type}",
                 "ts": _us(record.t, origin), "dur": 0, "pid": pid, "tid": tid,
                 "args": _message_args(envelope)}]
    args = _message_args(envelope) | {"latency_us": round((record.t - envelope.sent_at) * 1e6, 3)}
    return [{"ph": "X", "cat": "message", "name": envelope.type, "ts": _us(entry.began, origin),
             "dur": round(record.handled_s * 1e6, 3), "pid": pid, "tid": tid, "args": args}]


def _incident_event(entry: _Entry, pid: int, tid: int, origin: float) -> dict[str, Any]:
    group_wide = entry.record.event in GROUP_EVENTS
    args: dict[str, Any] = {"detail": entry.record.detail}
    if entry.envelope is not None:
        args |= {"message_id": entry.envelope.id, "message_type": entry.envelope.type}
    return {"ph": "i", "cat": "lifecycle" if group_wide else "incident", "name": entry.record.event,
            "s": "p" if group_wide else "t", "ts": _us(entry.record.t, origin),
            "pid": pid, "tid": tid, "args": args}


def _flow_events(recv: _Entry, send: _Entry, flow_id: int, ids: _Ids, origin: float) -> list[dict]:
    assert recv.envelope is not None
    common = {"cat": "message", "name": recv.envelope.type, "id": flow_id,
              "args": {"message_id": recv.envelope.id}}
    send_pid, send_tid = ids.thread(send)
    recv_pid, recv_tid = ids.thread(recv)
    # Each end has the ts of the slice it binds to: Chrome matches on (cat, pid, tid, ts),
    # Perfetto takes the slice open on that thread ("bp": "e" for the end).
    return [
        {"ph": "s", "ts": _us(send.record.t, origin), "pid": send_pid, "tid": send_tid, **common},
        {"ph": "f", "bp": "e", "ts": _us(recv.began, origin), "pid": recv_pid, "tid": recv_tid,
         **common},
    ]


def _chrome_events(entries: list[_Entry], origin: float) -> list[dict[str, Any]]:
    ids = _Ids()
    flows = _flows(entries)
    events: list[dict[str, Any]] = []
    for entry in entries:
        pid, tid = ids.thread(entry)
        if entry.record.event in ("send", "recv") and entry.envelope is not None:
            events += _message_events(entry, pid, tid, origin)
        elif entry.record.event in INCIDENT_KINDS + GROUP_EVENTS:
            events.append(_incident_event(entry, pid, tid, origin))
    # Flows last: at equal ts, Perfetto keeps file order, and a flow binds only to a slice
    # it has already seen.
    for entry in entries:
        if id(entry) in flows:
            send, flow_id = flows[id(entry)]
            events += _flow_events(entry, send, flow_id, ids, origin)
    return ids.metadata() + events


def to_chrome(run_dir: str | Path, out_path: str | Path) -> Path:
    """Write the run's trace as Chrome trace-event JSON (Perfetto, chrome://tracing).

    Timestamps are microseconds since the run's first event; its unix time is in
    `otherData.origin_unix_s`.
    """
    entries = _load(_trace_files(Path(run_dir)))
    origin, _ = _run_bounds(entries)
    document = {
        "traceEvents": _chrome_events(entries, origin),
        "displayTimeUnit": "ms",
        "otherData": {"run_dir": str(run_dir), "origin_unix_s": origin},
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: NaN is not JSON, and the viewers refuse the whole file over one.
    out_path.write_text(json.dumps(document, allow_nan=False))
    return out_path


# --- CLI ----------------------------------------------------------------------------------
def trace_command(
    run_dir: str, chrome: str | None = None, json_out: str | None = None,
    *, console: Console | None = None,
) -> TraceSummary:
    """`respec trace RUN_DIR [--chrome out.json] [--json summary.json]`.

    Prints the summary; writes the Chrome trace and the summary JSON when asked.
    Raises FileNotFoundError when RUN_DIR holds no trace files.
    """
    console = console or Console()
    summary = summarize(run_dir)
    print_summary(summary, console)
    if chrome:
        console.print(f"Chrome/Perfetto trace: {to_chrome(run_dir, chrome)}")
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary.to_dict(), indent=2, allow_nan=False))
        console.print(f"Summary JSON: {path}")
    return summary
