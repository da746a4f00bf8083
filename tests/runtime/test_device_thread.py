"""DeviceThread: an actor's work in order in one thread of its own, or on the loop when off."""

from __future__ import annotations

import asyncio
import sys
import threading

from respec.runtime import device_thread
from respec.runtime.device_thread import DeviceThread


def test_work_runs_in_order_in_its_named_thread_while_the_loop_turns():
    worker, seen, ticks = DeviceThread("probe", "cpu"), [], [0]

    def work(index: int) -> int:
        seen.append((index, threading.current_thread().name))
        threading.Event().wait(0.05)  # the loop must turn meanwhile
        return index * 2

    async def scenario() -> list[int]:
        async def ticker():
            while True:
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        results = [await worker.run(work, index) for index in range(3)]
        task.cancel()
        return results

    assert asyncio.run(scenario()) == [0, 2, 4]
    assert seen == [(0, "probe_0"), (1, "probe_0"), (2, "probe_0")] and ticks[0] > 10
    worker.close()


def test_off_it_runs_the_work_on_the_loop():
    worker = DeviceThread("probe", "cpu", enabled=False)
    assert asyncio.run(worker.run(lambda: threading.current_thread().name)) == threading.current_thread().name
    worker.close()


def test_a_thread_lowers_the_gil_switch_interval_and_never_raises_it():
    """With the default 5 ms the thread waited up to 5 ms for the GIL after each device
    wait (bench/gil_switch.py); off, the process's interval is left alone."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        DeviceThread("probe", "cpu", enabled=False).close()
        assert sys.getswitchinterval() == 0.005
        worker = DeviceThread("probe", "cpu")
        assert abs(sys.getswitchinterval() - device_thread.SWITCH_INTERVAL_S) < 1e-9
        worker.close()
        sys.setswitchinterval(0.0001)  # someone chose lower: kept
        DeviceThread("probe", "cpu").close()
        assert abs(sys.getswitchinterval() - 0.0001) < 1e-9
    finally:
        sys.setswitchinterval(before)
