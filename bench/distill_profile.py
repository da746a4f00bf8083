"""What one online head update costs on a GPU, and where: bench/gpu_distill.py's `distill_rollouts` on a
random model of a Qwen2.5 shape (float32 master under bf16 autocast, as the RL section
trains it), for a slice of rollouts of one length, timed call by call and profiled once.

    python3 bench/distill_profile.py [--shape 0.5b] [--rollouts 21] [--length 220]

A tool for making the RL section's training lane shorter, not a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_distill import distill_rollouts  # noqa: E402
from gpu_timing import sync  # noqa: E402
from gpu_train import random_model, shape_config  # noqa: E402

from respec.engine.drafters.eagle import EagleHead  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402
from respec.rl.trainer import TrainSample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--rollouts", type=int, default=21)
    parser.add_argument("--length", type=int, default=220, help="prompt + response tokens per rollout")
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = char_tokenizer().vocab_size
    master = random_model(shape_config(args.shape, vocab), device).float().eval()
    head = EagleHead.for_target(master).float().train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=5e-5)
    generator = torch.Generator().manual_seed(0)
    samples = [TrainSample(torch.randint(4, vocab, (40,), generator=generator),
                           torch.randint(4, vocab, (args.length - 40 - i % 7,), generator=generator),
                           torch.zeros(args.length - 40 - i % 7), float(i % 2), str(i)) for i in range(args.rollouts)]
    rewards = [s.reward for s in samples]
    for call in range(args.calls):
        sync(device)
        started = time.perf_counter()
        distill_rollouts(master, head, optimizer, samples, rewards, scale=1 / 3, apply=call % 3 == 2)
        sync(device)
        print(f"call {call}: {(time.perf_counter() - started) * 1e3:.1f} ms", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        distill_rollouts(master, head, optimizer, samples, rewards, scale=1 / 3, apply=True)
        sync(device)
    sort = "device_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
