"""Work an actor runs off its event loop: in order, in one thread of its own whose current
CUDA device is the actor's (CUDA's current device is per thread), so that the loop it
shares with other actors keeps handling their messages meanwhile. Off, the same calls run
on the loop itself (the in-loop way, kept for A/B runs).

The thread mostly waits on the device with the GIL released, and between two waits needs
it back for a moment. Python hands the GIL from a thread running Python to a waiting one
only every switch interval, 5 ms by default, and meanwhile the device idles: on the CPU
(`bench/gil_switch.py`) a worker of 60 steps of 1.5 ms took 4.2x its time beside a thread
running Python at 5 ms, 1.17-1.20x at 0.2 ms, while the busy thread's own work per second
moved by 3% at most. So a DeviceThread lowers the process's switch interval to
SWITCH_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from respec.engine.devices import use_device

SWITCH_INTERVAL_S = 0.0002  # the GIL's hand-over while a DeviceThread runs (module docstring)


class DeviceThread:
    def __init__(self, name: str, device: Any, enabled: bool = True) -> None:
        self.executor = (ThreadPoolExecutor(1, name, initializer=use_device, initargs=(str(device),))
                         if enabled else None)
        if enabled and sys.getswitchinterval() > SWITCH_INTERVAL_S:  # process-wide; never raised
            sys.setswitchinterval(SWITCH_INTERVAL_S)

    @property
    def threaded(self) -> bool:
        return self.executor is not None

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)` in the thread (the loop runs meanwhile), or on the loop when off."""
        return await self.start(work, *args)

    def start(self, work: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`work(*args)` under way when this returns: handed to the thread (await the future
        for its result while the caller does other things), or, when off, already run to its
        end on the loop."""
        loop = asyncio.get_running_loop()
        if self.executor is not None:
            return loop.run_in_executor(self.executor, functools.partial(work, *args))
        done = loop.create_future()
        try:
            done.set_result(work(*args))
        except Exception as error:  # noqa: BLE001 (the caller's await raises it, as in the thread)
            done.set_exception(error)
        return done

    def close(self) -> None:
        """Waits for the work in flight, so that nothing it uses is torn down under it."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
