"""Bare pyzmq baselines for the runtime benchmark: the same round trip with no respec layer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import zmq

ECHO_SERVER = """
import sys, zmq
context = zmq.Context()
server = context.socket(zmq.ROUTER)
server.bind(sys.argv[1])
print("ready", flush=True)
while True:
    frames = server.recv_multipart()
    if frames[1] == b"stop":
        break
    server.send_multipart(frames)
"""


def _echo_thread(context: zmq.Context, endpoint: str, ready: threading.Event) -> None:
    server = context.socket(zmq.ROUTER)
    server.bind(endpoint)
    ready.set()
    while True:
        frames = server.recv_multipart()
        if frames[1] == b"stop":
            break
        server.send_multipart(frames)
    server.close()


def raw_rtt_us(endpoint: str, count: int, warmup: int, payload: bytes) -> list[float]:
    """Round trips DEALER -> ROUTER echo -> DEALER; the server is a thread for inproc,
    another process otherwise (as respec's actors would be)."""
    context = zmq.Context()
    server = None
    if endpoint.startswith("inproc://"):
        ready = threading.Event()
        thread = threading.Thread(target=_echo_thread, args=(context, endpoint, ready), daemon=True)
        thread.start()
        ready.wait()
    else:
        server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, endpoint], stdout=subprocess.PIPE, text=True)
        server.stdout.readline()
    client = context.socket(zmq.DEALER)
    client.connect(endpoint)
    samples = []
    for index in range(warmup + count):
        started = time.perf_counter()
        client.send_multipart([payload])
        client.recv_multipart()
        if index >= warmup:
            samples.append((time.perf_counter() - started) * 1e6)
    client.send_multipart([b"stop"])
    if server is not None:
        server.wait(timeout=10)
    client.close(linger=100)
    context.term()
    return samples


def memcpy_ms(array: np.ndarray, repeats: int = 5) -> float:
    """Median time of one plain copy of the array (the floor for moving it at all)."""
    target = np.empty_like(array)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, array)
        times.append((time.perf_counter() - started) * 1e3)
    return float(np.median(times))
