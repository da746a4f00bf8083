"""What the GRPO update's proximal pass costs: `GRPOTrainer.step` on the prepared tiny
policy with and without a separate forward pass for the proximal log-probs (one epoch
needs none: the weights being trained are the proximal ones), interleaved, CPU time of
this thread, median over repeats.

    python bench/update_cost.py [--model models/tiny/policy] [--rollouts 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from respec.engine.checkpoint import load_model  # noqa: E402
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/tiny/policy")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_model(args.model).float().eval()
    samples = rollouts(args.rollouts, base.config.vocab_size)
    trainers = {}
    for separate in (True, False):
        trainer = GRPOTrainer(copy.deepcopy(base), TrainerConfig(lr=1e-5, micro_batch=8))
        trainer._proximal_pass = lambda separate=separate: separate
        trainers[separate] = trainer
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for separate, trainer in trainers.items():
            started = time.process_time()
            trainer.step(samples)
            seconds[separate].append(time.process_time() - started)
    with_pass, without = (statistics.median(seconds[s][1:]) for s in (True, False))  # the first: warm-up
    print(f"update with a proximal pass {with_pass * 1e3:.0f} ms, without {without * 1e3:.0f} ms: "
          f"{without / with_pass:.2f}x the time ({args.rollouts} rollouts of 8-29 tokens, one thread)")


def rollouts(count: int, vocab: int) -> list[TrainSample]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        length = int(torch.randint(8, 30, (1,), generator=generator))
        out.append(TrainSample(torch.randint(4, vocab, (12,), generator=generator),
                               torch.randint(4, vocab, (length,), generator=generator),
                               torch.full((length,), -2.0), float(i % 3 == 0), str(i // 8)))
    return out


if __name__ == "__main__":
    main()
