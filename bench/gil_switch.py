"""How long a thread that mostly waits on the device takes to make its steps while another
thread of the process runs Python, at several GIL switch intervals.

    python3 bench/gil_switch.py [--steps 60] [--step-ms 1.5] [--json f.json]

The worker stands in for FastRollouts' batch thread: each step it blocks with the GIL
released (as a CUDA synchronisation does) for --step-ms, then runs a little Python (the
next replay's launch, the done flags). The busy thread stands in for the event loop the
actor shares, sending, encoding and scoring rollouts. A thread that wants the GIL back
waits until the holder lets go, which a thread running Python does every switch interval
(Python's default: 5 ms); meanwhile the device idles. Prints the worker's time alone and
beside the busy thread, per interval, and how much Python the busy thread got done a
second meanwhile (docs/RUNTIME.md, "The batch on the loop, or in a
thread").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path


def worker_time(steps: int, step_s: float, busy: bool) -> tuple[float, float]:
    """Seconds the worker takes for its steps, with the busy thread beside it or not, and
    the busy thread's Python work per second meanwhile (0 without it)."""
    stop, took, spins = threading.Event(), [], [0]

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))
            spins[0] += 1

    def work() -> None:
        pause = threading.Event()
        started = time.perf_counter()
        for _ in range(steps):
            pause.wait(step_s)  # blocked, GIL released: the device's step
            sum(range(50))  # the host's Python between two steps
        took.append(time.perf_counter() - started)

    spinner = threading.Thread(target=spin) if busy else None
    if spinner is not None:
        spinner.start()
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    stop.set()
    if spinner is not None:
        spinner.join()
    return took[0], spins[0] / took[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-ms", type=float, default=1.5)
    parser.add_argument("--intervals-ms", default="5,1,0.5,0.2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    before = sys.getswitchinterval()
    rows = []
    try:
        for interval in (float(ms) / 1e3 for ms in args.intervals_ms.split(",")):
            sys.setswitchinterval(interval)
            alone = statistics.median(worker_time(args.steps, args.step_ms / 1e3, False)[0]
                                      for _ in range(args.repeats))
            beside, rate = (statistics.median(values) for values in zip(
                *(worker_time(args.steps, args.step_ms / 1e3, True) for _ in range(args.repeats)), strict=True))
            rows.append({"switch_interval_ms": interval * 1e3, "alone_ms": alone * 1e3, "beside_busy_ms": beside * 1e3,
                         "ratio": beside / alone, "busy_work_per_s": rate})
    finally:
        sys.setswitchinterval(before)
    print(f"{args.steps} steps of {args.step_ms} ms, median of {args.repeats}\n"
          "| switch interval ms | worker alone ms | beside busy Python ms | ratio | busy thread's work / s |\n"
          "| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['switch_interval_ms']:g} | {row['alone_ms']:.1f} | {row['beside_busy_ms']:.1f} | "
              f"{row['ratio']:.2f} | {row['busy_work_per_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "step_ms": args.step_ms, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
