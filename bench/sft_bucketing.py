"""Does cutting SFT batches by length hurt the policy? bench/gpu_train.py's SFT on the CPU,
a small Qwen2 shape on the built-in arithmetic task (2-5 operands up to 9), the same steps
and seeds with random batches (pool of 1) and with length-bucketed ones (pool of 16, as
bench/gpu.py trained from b19d26e on), held-out greedy accuracy after each.

    python bench/sft_bucketing.py --json f.json [--steps 600] [--seeds 0,1,2]

A few minutes per run on two cores. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_train import accuracy, train_policy  # noqa: E402

from respec.tasks import make_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pools", default="1,16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = make_task("arithmetic", max_value=9, min_operands=2, max_operands=5)
    heldout = task.heldout(200, seed=12345)
    runs = []
    for pool in (int(p) for p in args.pools.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            model, report = train_policy(task, "sft_ab", "cpu", args.steps, batch=32, lr=3e-3, seed=seed,
                                         bucket_pool=pool)
            runs.append({"pool": pool, "seed": seed, "accuracy_greedy": accuracy(model, task, heldout, 0.0, 48),
                         "padding_share": report["padding_share"], "loss_last": report["loss_last"],
                         "wall_s": report["wall_s"]})
            print(json.dumps(runs[-1]), flush=True)
    Path(args.json).write_text(json.dumps({"steps": args.steps, "runs": runs}, indent=2))
    print("| batches | seeds | held-out accuracy (greedy), each | mean | padding share |\n| --- | --- | --- | --- | --- |")
    for pool in sorted({r["pool"] for r in runs}):
        mine = [r for r in runs if r["pool"] == pool]
        accuracies = [r["accuracy_greedy"] for r in mine]
        print(f"| {'random' if pool == 1 else f'bucketed (pool {pool})'} | {len(mine)} | "
              f"{', '.join(f'{a:.3f}' for a in accuracies)} | {statistics.mean(accuracies):.3f} | "
              f"{statistics.mean(r['padding_share'] for r in mine):.2f} |")


if __name__ == "__main__":
    main()
