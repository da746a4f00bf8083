"""bench/gpu.py's timing pieces: the HBM floor, throughput of a batch,
transformers' eager decoding as the peer (one step's cost is FastGenerator.time_step, the
scheduler's choice from a profile respec.sched.draft_lengths)."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from respec.engine.fast import FastGenerator
from respec.engine.model import CausalLM


def copy_bandwidth(device: str, gib: float = 1.0, repeats: int = 20) -> dict:
    """Device-to-device copy of `gib` GiB: bytes moved per second, counting the read and
    the write (the memory traffic a weight read competes with), and counting one side."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    seconds = timed(lambda: target.copy_(source), device, repeats)
    return {"bytes": source.numel(), "seconds": seconds, "read_write_bytes_per_s": 2 * source.numel() / seconds,
            "one_way_bytes_per_s": source.numel() / seconds}


def timed(work, device: str, repeats: int) -> float:
    """Median seconds of `work()` over `repeats` runs, synchronised around each."""
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_cached_memory(device: str) -> None:
    """Give the allocator's cached blocks back: a long-sequence SFT left so little free memory
    that the next CUDA stream could not be created (out of memory at the accuracy check)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def weight_bytes(model: CausalLM) -> int:
    """Bytes one decoding step must read: every distinct parameter once (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def throughput(generator: FastGenerator, prompts: list[list[int]], k_for_bucket, device: str,
               repeats: int = 5) -> dict:
    """Generated tokens per second for the whole batch (prefill to the last row's end),
    median of `repeats`, and the mean accepted drafts per verification step."""
    return compare({"only": (generator, k_for_bucket)}, prompts, device, repeats)["only"]


def compare(configs: dict, prompts: list[list[int]], device: str, repeats: int = 5) -> dict:
    """``throughput`` of several (generator, k_for_bucket) configs on the same prompts, the
    repeats interleaved (config a, b, c, a, b, c, ...) so that drift of the machine lands
    on every config alike, and every config of repeat r seeded alike (common random
    numbers: how long the longest sampled row runs is most of a batch's variance, and
    two configs that make the same choices then sample the same rows); each config's
    median run."""
    runs: dict[str, list] = {name: [] for name in configs}
    for generator, k_for_bucket in configs.values():
        generator.generate(prompts, k_for_bucket)  # capture graphs outside the timing
    for repeat in range(repeats):
        for name, (generator, k_for_bucket) in configs.items():
            torch.manual_seed(1000 + repeat)
            sync(device)
            started = time.perf_counter()
            results = generator.generate(prompts, k_for_bucket)
            sync(device)
            runs[name].append((time.perf_counter() - started, results))
    return {name: _stats(sorted(timed_runs, key=lambda run: run[0])[len(timed_runs) // 2])
            for name, timed_runs in runs.items()}


def _stats(run) -> dict:
    seconds, results = run
    tokens = sum(len(r.tokens) for r in results)
    steps = sum(r.steps for r in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "accepted_per_step": sum(r.accepted for r in results) / max(1, steps),
            "tokens_per_step": (tokens - len(results)) / max(1, steps)}


def hf_decode_seconds(checkpoint_dir: str, prompt: list[int], device: str, new_tokens: int = 64) -> dict:
    """transformers' own eager Qwen2 on the same weights: greedy `generate`, seconds per token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.bfloat16).to(device).eval()
    inputs = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(inputs, **kwargs)  # warm-up
        seconds = timed(lambda: model.generate(inputs, **kwargs), device, 3)
        tokens = model.generate(inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):]
    return {"seconds_per_token": seconds / new_tokens, "greedy_tokens": tokens.tolist()}
