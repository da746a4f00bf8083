"""`respec bench peers`: respec's engine against vLLM, same policy, same prompt ids, greedy.

For each batch size b, the same P prompts go through both engines in chunks of b (one
`generate` call per chunk, all b rows decoded together): generated tokens (stop token
included) per second of wall time, prefill included, and the ratio respec / vLLM. The
settings compared, each a *phase* with one vLLM engine:

- ``nosd``: plain decoding on both sides;
- ``sd_ngram``: prompt-lookup drafting, a chain of k tokens (respec's ``NgramDrafter``,
  vLLM's ``ngram`` method, n-grams of 1-4 tokens on both);
- ``sd_eagle3``: one EAGLE-3 head in the public layout, distilled by respec for the policy
  (``peers_eagle3``), drafting a chain of k on both sides (vLLM's ``eagle3`` method);
- ``sd_eagle``: respec's own EAGLE head (``models/tiny/eagle``), which vLLM cannot load;
  its vLLM column is vLLM's EAGLE-3 run of the same phase.

Fairness: equal compute threads (``peers_vllm.configure_cpu``; respec's compute thread is
pinned to the cores vLLM's worker is bound to), warm-up calls excluded, repeats interleaved
(respec, vLLM, respec, vLLM, ...) with a pause before each timed call so vLLM's worker,
which busy-polls for 1 s after its last step, is idle while respec runs. Every row checks
that both engines emitted the same tokens for every prompt.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from respec.bench.peers_vllm import (
    VllmSide,
    configure_cpu,
    configure_single_process,
    require_vllm,
    speculative_config,
)
from respec.bench.sd import bench_prompts
from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.speculative import Sampling, SpeculativeEngine

MODES = ("nosd", "sd_ngram", "sd_eagle3", "sd_eagle")
VLLM_MAX_LEN = 512


@dataclass(frozen=True)
class Phase:
    vllm_method: str | None  # None, "ngram" or "eagle3"
    modes: tuple[str, ...]  # respec settings timed against that engine


PHASES = (Phase(None, ("nosd",)), Phase("ngram", ("sd_ngram",)), Phase("eagle3", ("sd_eagle3", "sd_eagle")))


@dataclass
class Settings:
    model: str
    eagle: str  # respec's own head
    eagle3: str  # a head in the EAGLE-3 layout (trained there if missing)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    modes: tuple[str, ...] = MODES
    prompts: int = 64
    max_new_tokens: int = 64
    k: int = 4
    repeats: int = 3
    threads: int = 1
    device: str = "cpu"
    pause_s: float = 1.2
    vllm_single_process: bool = False  # vLLM's engine in this process, on this thread (see peers_vllm)


@dataclass
class Timing:
    seconds: list[float]
    tokens: int
    outputs: list[list[int]]
    steps: int = 0
    cpu_seconds: list[float] = field(default_factory=list)  # this process and vLLM's, during the run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / statistics.median(self.seconds)

    @property
    def best_tokens_per_s(self) -> float:
        """From the fastest repeat: the least disturbed by other load on a shared machine."""
        return self.tokens / min(self.seconds)


def run_benchmark(settings: Settings, progress: Callable[[str], None] = print) -> dict:
    vllm_version = require_vllm()
    environment = configure_cpu(settings.threads) if settings.device == "cpu" else {}
    if settings.vllm_single_process:
        environment |= configure_single_process()
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    head_info = _eagle3_head(settings) if "sd_eagle3" in settings.modes or "sd_eagle" in settings.modes else None
    model = load_model(Path(settings.model), device=settings.device)
    prompts, stop = bench_prompts(Path(settings.model), settings.prompts)
    load_before = os.getloadavg()
    rows = []
    for phase in PHASES:
        modes = tuple(m for m in phase.modes if m in settings.modes)
        if modes:
            rows += _run_phase(settings, phase, modes, model, prompts, stop, progress)
    _add_best_vllm(rows)
    return {"model": settings.model, "eagle": settings.eagle, "eagle3": head_info, "device": settings.device,
            "sampling": "greedy (temperature 0), stop at <eos>", "prompts": settings.prompts,
            "max_new_tokens": settings.max_new_tokens, "k": settings.k, "repeats": settings.repeats,
            "threads": settings.threads, "torch_threads": torch.get_num_threads(), "vllm": vllm_version,
            "torch": torch.__version__, "environment": environment, "pause_s": settings.pause_s,
            "vllm_single_process": settings.vllm_single_process,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}


def _eagle3_head(settings: Settings) -> dict:
    from respec.bench.peers_eagle3 import ensure_eagle3_head

    return ensure_eagle3_head(settings.model, settings.eagle3)


def _run_phase(settings: Settings, phase: Phase, modes: tuple[str, ...], model, prompts, stop, progress) -> list[dict]:
    spec = speculative_config(phase.vllm_method, settings.k, settings.eagle3)
    progress(f"phase {phase.vllm_method or 'nosd'}: starting vLLM")
    vllm = VllmSide(settings.model, settings.device, VLLM_MAX_LEN, spec)
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)  # respec's side, whatever vLLM's start did
    drafters = {mode: _drafter(mode, model, settings) for mode in modes}
    rows = []
    try:
        for batch in settings.batches:
            rows += _run_batch(settings, batch, modes, drafters, model, vllm, prompts, stop)
            progress(f"phase {phase.vllm_method or 'nosd'}: batch {batch} done")
    finally:
        vllm.close()
    for row in rows:
        row["vllm_engine"] = phase.vllm_method or "none"
    return rows


def _drafter(mode: str, model, settings: Settings):
    if mode == "nosd":
        return None
    if mode == "sd_ngram":
        from respec.engine.drafters.ngram import NgramDrafter

        return NgramDrafter(min_n=1, max_n=4)
    from respec.engine.drafters.eagle import EagleDrafter, EagleHead

    return EagleDrafter(model, EagleHead.load(settings.eagle3 if mode == "sd_eagle3" else settings.eagle, model))


def _run_batch(settings: Settings, batch: int, modes, drafters, model, vllm: VllmSide, prompts, stop) -> list[dict]:
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    id_chunks = [[p.tolist() for p in chunk] for chunk in chunks]
    shape = DraftShape.chain(settings.k)
    max_len = max(len(p) for p in prompts) + settings.max_new_tokens + settings.k + 2
    sampling = Sampling(temperature=0.0, max_new_tokens=settings.max_new_tokens, stop_token_ids=stop)
    runners = {m: _respec_runner(model, drafters[m], None if m == "nosd" else shape, batch, max_len, sampling)
               for m in modes}
    runners["vllm"] = lambda chunk_ids: (vllm.generate(chunk_ids, settings.max_new_tokens, stop), 0)
    inputs = {name: (id_chunks if name == "vllm" else chunks) for name in runners}
    for name, run in runners.items():  # warm-up, not timed
        run(inputs[name][0])
    timings: dict[str, Timing] = {}
    for _ in range(settings.repeats):
        for name, run in runners.items():
            time.sleep(settings.pause_s)
            with _pinned(settings, this_thread_computes=name != "vllm" or settings.vllm_single_process):
                _record(timings, name, *_timed(run, inputs[name]))
    return [_row(batch, mode, timings[mode], timings["vllm"]) for mode in modes]


def _respec_runner(model, drafter, shape, batch: int, max_len: int, sampling: Sampling):
    engine = SpeculativeEngine(model, drafter, max_rows=batch, max_len=max_len)

    def run(chunk: list[torch.Tensor]) -> tuple[list[list[int]], int]:
        with torch.inference_mode():
            rows = engine.generate(chunk, sampling, shape)
        return [row.tokens for row in rows], sum(row.steps for row in rows)

    return run


def _timed(run, chunks) -> tuple[float, list[list[int]], int, float]:
    outputs, steps = [], 0
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    for chunk in chunks:
        tokens, chunk_steps = run(chunk)
        outputs += tokens
        steps += chunk_steps
    wall = time.perf_counter() - started
    return wall, outputs, steps, cpu_seconds() - cpu_before


def _record(timings: dict[str, Timing], name: str, seconds: float, outputs: list[list[int]], steps: int,
            cpu: float) -> None:
    if name not in timings:
        timings[name] = Timing([seconds], sum(len(o) for o in outputs), outputs, steps, [cpu])
        return
    if outputs != timings[name].outputs:
        raise AssertionError(f"{name}: greedy outputs changed between repeats")
    timings[name].seconds.append(seconds)
    timings[name].cpu_seconds.append(cpu)


def cpu_seconds() -> float:
    """User + system CPU seconds so far of this process and of every process it started
    (vLLM's engine core and worker), from /proc; 0.0 without /proc. Unlike wall time, CPU
    time does not grow while other load keeps a process off the cores."""
    ticks, parents = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in parents.items():
        children.setdefault(parent, []).append(pid)
    pending, total = [os.getpid()], 0.0
    while pending:
        pid = pending.pop()
        total += parents.get(pid, (0, 0.0))[1]
        pending += children.get(pid, [])
    return total


@contextmanager
def _pinned(settings: Settings, this_thread_computes: bool) -> Iterator[None]:
    """This thread on the cores vLLM's worker is bound to while it computes (respec's runs,
    and vLLM's too when it runs in this process)."""
    if not (this_thread_computes and settings.device == "cpu" and hasattr(os, "sched_setaffinity")):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(range(settings.threads)))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _row(batch: int, mode: str, ours: Timing, theirs: Timing) -> dict:
    differ = sum(a != b for a, b in zip(ours.outputs, theirs.outputs, strict=True))
    rows = len(ours.outputs)
    return {"batch": batch, "mode": mode, "respec_tokens_per_s": round(ours.tokens_per_s, 1),
            "vllm_tokens_per_s": round(theirs.tokens_per_s, 1),
            "ratio": round(ours.tokens_per_s / theirs.tokens_per_s, 3),
            "ratio_best": round(ours.best_tokens_per_s / theirs.best_tokens_per_s, 3), "tokens_equal": differ == 0,
            "rows_differ": differ, "tokens": ours.tokens, "vllm_tokens": theirs.tokens,
            "respec_accept_len": round((ours.tokens - rows) / max(ours.steps, 1), 3) if mode != "nosd" else 1.0,
            "respec_s": [round(s, 4) for s in ours.seconds], "vllm_s": [round(s, 4) for s in theirs.seconds],
            "respec_cpu_s": [round(s, 3) for s in ours.cpu_seconds], "vllm_cpu_s": [round(s, 3) for s in theirs.cpu_seconds],
            "ratio_per_cpu_s": _cpu_ratio(ours, theirs)}


def _cpu_ratio(ours: Timing, theirs: Timing) -> float | None:
    """respec / vLLM in tokens per CPU-second (median CPU time of the repeats)."""
    if not (ours.cpu_seconds and theirs.cpu_seconds) or min(ours.cpu_seconds + theirs.cpu_seconds) <= 0:
        return None
    return round((ours.tokens / statistics.median(ours.cpu_seconds)) / (theirs.tokens / statistics.median(theirs.cpu_seconds)), 3)


def _add_best_vllm(rows: list[dict]) -> None:
    """ratio_vs_vllm_best: respec against vLLM's fastest setting at that batch size."""
    for row in rows:
        best = max(r["vllm_tokens_per_s"] for r in rows if r["batch"] == row["batch"])
        row["ratio_vs_vllm_best"] = round(row["respec_tokens_per_s"] / best, 3)
