"""DeviceThread: an actor's work in order in one thread of its own, or on the loop when off."""

from __future__ import annotations

import asyncio
import threading

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
