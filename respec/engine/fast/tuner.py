"""Choosing the Triton kernels' configurations on the device, and remembering them.

`tuned` times every candidate configuration of a kernel shape on its first use, as a step
runs it (back to back in a CUDA graph), and keeps the fastest. A run of the actor graph at
the 0.5B shape meets a few dozen shapes (four products and attention, per block of rows and
draft length), and its first RL step came 20-55 s after the start on an H100, most of it
capturing and tuning (docs/PERFORMANCE.md, "The fast path on an H100 after 198c9fe", 6).
The choice depends only on the GPU, the kernels' code and the shape, so it also goes to
disk (TuningCache) and a later run on the same machine reads it back.

One JSON file per (GPU name, Triton version, the source of kernels.py and of this file): a
new GPU, Triton, kernel code or way of timing starts a new file, so a configuration is
never reused where it may not build or may no longer be the fastest. RESPEC_TUNE_CACHE
names the file's folder (default ~/.cache/respec); RESPEC_TUNE_CACHE=off turns it off.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import warnings
from pathlib import Path

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from respec.files import cache_folder, file_name_part, write_atomically

SOURCES = (Path(__file__).with_name("kernels.py"), Path(__file__))  # the kernels and how they are timed
chosen: dict[tuple, tuple] = {}  # this process's choices, by kernel key


def tuned(launch, key: tuple, x: Tensor, heuristic: tuple, candidates: tuple) -> tuple:
    """The fastest of the candidate configurations for this launch on this GPU, timed on
    first use (outside graph capture: the fast path warms every step up first); the
    heuristic elsewhere. Timed as a step runs it: back to back in a CUDA graph, each launch
    after a read of 64 MB, more than an H100's L2, so the weights come from HBM as they do
    in a step, not from the cache (a read, not a write: written lines would still be
    draining to HBM during the timed launch). Events around single launches outside a
    graph timed the host's launch too, and picked for the output product a configuration
    that took 4.9 us in a graph where the best took 2.9 (one H100 run, a6d97bf:
    docs/PERFORMANCE.md, "Tuning in a graph"). A choice an earlier run made on this GPU with
    this code is read back from disk instead (TuningCache)."""
    if key in chosen:
        return chosen[key]
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return heuristic
    stored = stored_choices(x.device).get(key)  # tuned by an earlier run on this GPU, with this code
    if stored is not None:
        chosen[key] = stored
        return stored
    flush = torch.ones(16 << 20, dtype=torch.float32, device=x.device)

    def timed(config: tuple, launches: int) -> float | None:
        """Milliseconds per flush-and-launch in a graph of `launches` of them (the flush
        costs every configuration the same), None where the shape cannot build."""
        try:
            launch(config)  # compiles
        except OutOfResources:  # too big a block for this shape: not a candidate
            return None
        return graph_ms(lambda: (flush.sum(), launch(config)), launches)

    chosen[key] = fastest(timed, (heuristic, *candidates))
    stored_choices(x.device).put(key, chosen[key])
    return chosen[key]


_stored: dict[torch.device, TuningCache] = {}


def stored_choices(device: torch.device) -> TuningCache:
    """This GPU's tuning cache, read once per process."""
    if device not in _stored:
        _stored[device] = TuningCache(cache_path(device, *SOURCES))
    return _stored[device]


def graph_ms(work, calls: int, replays: int = 1) -> float:
    """Milliseconds per call of `work` (CUDA launches only), captured `calls` times back to
    back in one CUDA graph and timed over `replays` replays after one that uploads it: the
    time a step's graph gives it, without the host's launch."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            work()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def fastest(timed, configs: tuple, finalists: int = 3, rounds: int = 3) -> tuple:
    """The configuration with the lowest time: every one timed once, then the `finalists`
    best timed again in `rounds` interleaved rounds, which decide. With one pass a lucky
    median can win: in one H100 run with more candidates the step at batch 4 took 1.63 ms
    against 1.22 ms in the runs beside it (docs/PERFORMANCE.md, "Wider GEMV tiles"; that
    the tuner's pick was the cause is likely, not shown)."""
    first = {config: timed(config, 20) for config in configs}
    ranked = sorted((config for config, ms in first.items() if ms is not None), key=first.get)[:finalists]
    again: dict[tuple, list[float]] = {config: [] for config in ranked}
    for _ in range(rounds):
        for config in ranked:
            again[config].append(timed(config, 10))
    return min(ranked, key=lambda config: statistics.median(again[config]))


class TuningCache:
    """Configurations by kernel key (a tuple of names, sizes and flags), in one JSON file.
    Several processes may share the file (a trainer and a generator on one GPU): each
    write merges what is on disk with its own choices and replaces the file atomically, so
    a reader sees a whole file and at most a concurrent choice is lost (and tuned again)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries = self._read() if path is not None else {}

    def get(self, key: tuple) -> tuple | None:
        config = self.entries.get(repr(key))
        return tuple(config) if config is not None else None

    def put(self, key: tuple, config: tuple) -> None:
        self.entries[repr(key)] = list(config)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps({**self._read(), **self.entries}, indent=1, sort_keys=True))
        except OSError as error:  # a read-only home, a full disk: tune every run, as without it
            warnings.warn(f"kernel tuning cache {self.path} not writable ({error}): tuning again in every run",
                          stacklevel=2)
            self.path = None

    def _read(self) -> dict[str, list]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or cut short by a crash: start again
            return {}
        return entries if isinstance(entries, dict) else {}


def cache_path(device: torch.device, *sources: Path) -> Path | None:
    """This GPU's file for kernels of these sources, None where RESPEC_TUNE_CACHE=off."""
    folder = cache_folder()
    if folder is None:
        return None
    gpu = file_name_part(torch.cuda.get_device_name(device))
    code = hashlib.sha256(b"".join(source.read_bytes() for source in sources)).hexdigest()[:12]
    return folder / f"kernels-{gpu}-triton{triton.__version__}-{code}.json"
