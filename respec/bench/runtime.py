"""`respec bench runtime`: what the actor runtime costs over bare ZeroMQ, measured in one run.

- round-trip latency (p50/p99) of a small request between two actors over inproc, ipc and
  tcp, beside the same round trip with bare pyzmq sockets (the baseline);
- one-way throughput of small messages between two processes over ipc;
- one-way time of a 64 MiB float32 array between two processes, beside a plain memcpy.
"""

from __future__ import annotations

import tempfile

import numpy as np
from rich.table import Table

from respec.bench.console import table_console
from respec.bench.raw_zmq import memcpy_ms, raw_rtt_us
from respec.runtime.graph import parse_config
from respec.runtime.launcher import Launcher

TRANSPORTS = ("inproc", "ipc", "tcp")


def _run_graph(name: str, actors: dict, transport: str = "ipc", runs_dir: str | None = None) -> dict:
    raw = {"run": {"name": name, "transport": transport, "runs_dir": runs_dir or tempfile.mkdtemp(),
                   "trace": {"enabled": False}, "timeout_s": 300}, "actors": actors}
    result = Launcher(parse_config(raw, f"bench:{name}"), progress=False).run()
    if not result.ok:
        raise RuntimeError(f"benchmark graph {name} failed: {result.reason}")
    return {key: value for row in result.metrics for key, value in row.items()}


def respec_rtt(transport: str, count: int, warmup: int) -> dict:
    server_group = "main" if transport == "inproc" else "server"
    actors = {
        "pinger": {"class": "respec.actors.demo.echo.Pinger", "params": {"count": count, "warmup": warmup}},
        "echo": {"class": "respec.actors.demo.echo.Echo", "group": server_group},
    }
    return _run_graph(f"bench_rtt_{transport}", actors, "tcp" if transport == "tcp" else "ipc")


def raw_rtt(transport: str, count: int, warmup: int) -> dict:
    endpoint = {
        "inproc": "inproc://bench-raw",
        "ipc": f"ipc://{tempfile.mkdtemp(prefix='respec-raw-')}/echo",
        "tcp": "tcp://127.0.0.1:0",
    }[transport]
    if transport == "tcp":
        from respec.runtime.plan import _free_port

        endpoint = f"tcp://127.0.0.1:{_free_port('127.0.0.1')}"
    samples = np.array(raw_rtt_us(endpoint, count, warmup, b"x" * 64))
    return {"rtt_p50_us": float(np.percentile(samples, 50)), "rtt_p99_us": float(np.percentile(samples, 99))}


def throughput(count: int) -> float:
    actors = {
        "ticker": {"class": "respec.actors.demo.ticker.Ticker", "params": {"count": count, "payload_size": 0}},
        "collector": {"class": "respec.actors.demo.rate.RateCollector", "group": "sink",
                      "params": {"expected": count}},
    }
    return _run_graph("bench_throughput", actors)["msgs_per_s"]


def big_array(repeats: int) -> float:
    actors = {
        "sender": {"class": "respec.actors.demo.rate.ArraySender",
                   "params": {"count": repeats, "megabytes": 64}},
        "receiver": {"class": "respec.actors.demo.rate.ArrayReceiver", "group": "sink",
                     "params": {"expected": repeats, "megabytes": 64}},
    }
    return _run_graph("bench_array", actors)["transfer_ms_median"]


def run_benchmark(quick: bool = False) -> dict:
    count, warmup = (300, 50) if quick else (5000, 500)
    results: dict = {"rtt_p50_us": {}, "rtt_p99_us": {}, "raw_rtt_p50_us": {}, "raw_rtt_p99_us": {},
                     "overhead_ratio": {}}
    for transport in TRANSPORTS:
        ours, raw = respec_rtt(transport, count, warmup), raw_rtt(transport, count, warmup)
        results["rtt_p50_us"][transport] = round(ours["rtt_p50_us"], 1)
        results["rtt_p99_us"][transport] = round(ours["rtt_p99_us"], 1)
        results["raw_rtt_p50_us"][transport] = round(raw["rtt_p50_us"], 1)
        results["raw_rtt_p99_us"][transport] = round(raw["rtt_p99_us"], 1)
        # the ratio of the two reported numbers, so the JSON is consistent with itself
        ratio = results["rtt_p50_us"][transport] / results["raw_rtt_p50_us"][transport]
        results["overhead_ratio"][transport] = round(ratio, 2)
    results["msgs_per_s"] = round(throughput(20_000 if quick else 200_000))
    results["tensor_64mib_ms"] = round(big_array(2 if quick else 7), 2)
    results["memcpy_64mib_ms"] = round(memcpy_ms(np.ones(16 * 2**20, dtype=np.float32)), 2)
    results["tensor_over_memcpy"] = round(results["tensor_64mib_ms"] / results["memcpy_64mib_ms"], 2)
    _print(results)
    return results


def _print(results: dict) -> None:
    table = Table(title="respec bench runtime")
    for column in ("transport", "respec p50 µs", "raw p50 µs", "ratio", "respec p99 µs", "raw p99 µs"):
        table.add_column(column, justify="right")
    for transport in TRANSPORTS:
        table.add_row(transport, *(str(results[key][transport]) for key in
                                   ("rtt_p50_us", "raw_rtt_p50_us", "overhead_ratio", "rtt_p99_us", "raw_rtt_p99_us")))
    console = table_console()
    console.print(table)
    console.print(f"small messages over ipc: {results['msgs_per_s']:,} msgs/s")
    console.print(f"64 MiB float32 across processes: {results['tensor_64mib_ms']} ms "
                  f"(memcpy {results['memcpy_64mib_ms']} ms, {results['tensor_over_memcpy']}x)")
