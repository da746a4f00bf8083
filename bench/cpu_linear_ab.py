"""A/B of respec's oneDNN linear path (respec/engine/cpu_linear.py) against MKL's F.linear:
CPU seconds (robust to other load on a shared machine) per pass over the `respec bench peers`
prompts, no SD, best of 5 interleaved runs, and whether the tokens are the same.

    PYTHONPATH=. python bench/cpu_linear_ab.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from respec.bench.sd import bench_prompts
from respec.engine import cpu_linear
from respec.engine.checkpoint import load_model
from respec.engine.speculative import Sampling, SpeculativeEngine

MODEL = Path("models/tiny/policy")


def one_pass(engine: SpeculativeEngine, chunks, sampling) -> tuple[float, list[list[int]]]:
    started = time.process_time()
    tokens = [row.tokens for chunk in chunks for row in engine.generate(chunk, sampling)]
    return time.process_time() - started, tokens


def main() -> None:
    torch.set_num_threads(1)
    model = load_model(MODEL)
    prompts, stop = bench_prompts(MODEL, 64)
    sampling = Sampling(0.0, max_new_tokens=64, stop_token_ids=stop)
    for batch in (1, 8, 16, 32, 64):
        engine = SpeculativeEngine(model, None, max_rows=batch, max_len=96)
        chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        seconds: dict[str, list[float]] = {"mkl": [], "onednn": []}
        outputs = {}
        for _ in range(5):
            for name, min_rows in (("mkl", 10**9), ("onednn", 8)):
                cpu_linear.MIN_ROWS = min_rows
                spent, outputs[name] = one_pass(engine, chunks, sampling)
                seconds[name].append(spent)
        tokens = sum(len(t) for t in outputs["mkl"])
        best = {name: min(values) for name, values in seconds.items()}
        print(f"batch {batch}: same tokens {outputs['mkl'] == outputs['onednn']}, tokens per CPU-s: "
              f"MKL {tokens / best['mkl']:.0f}, oneDNN {tokens / best['onednn']:.0f} "
              f"({best['mkl'] / best['onednn']:.2f}x)")


if __name__ == "__main__":
    main()
