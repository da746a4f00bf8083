"""Which kernels one fast-path step launches on a GPU, and what each costs: a random model
of a Qwen2.5 shape, one decode step (k = 0) and one SD step (k = 4) under torch.profiler.

    python3 bench/gpu_profile.py [--shape 0.5b] [--batch 1]

Prints the kernel count per step and the kernels by total time; the graph-replayed
step time beside the eager one. A tool for making the fast path faster, not a result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_train import random_model, shape_config  # noqa: E402

from respec.engine.drafters.eagle import EagleHead  # noqa: E402
from respec.engine.fast import FastGenerator  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-kernels", action="store_true", help="the layers in PyTorch's kernels, not Triton's")
    args = parser.parse_args()
    use_kernels = not args.no_kernels
    model = random_model(shape_config(args.shape, char_tokenizer().vocab_size), "cuda")
    head = EagleHead.for_target(model).eval()
    b = args.batch
    for k in (0, 4):
        eager = FastGenerator(model, head if k else None, max_rows=b, max_len=256, max_new=128, max_k=4, graphs=False,
                              kernels=use_kernels)
        graphed = FastGenerator(model, head if k else None, max_rows=b, max_len=256, max_new=128, max_k=4,
                                kernels=use_kernels)
        print(f"k={k}: graphed {graphed.time_step(b, k, 50) * 1e3:.3f} ms, "
              f"eager {eager.time_step(b, k, 10) * 1e3:.3f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager.step(b, k)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        print(f"k={k}: {len(kernels)} kernels per step, {sum(e.device_time for e in kernels):.0f} us of kernel time")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))


if __name__ == "__main__":
    main()
