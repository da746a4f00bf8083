"""Where the RL step's training lane goes on a GPU, and what shortens it: bench/gpu_rl.py's
GRPO update and head distillation on a random model of a Qwen2.5 shape (float32 master
under bf16 autocast, as the RL section trains), with RL-like rollouts (4 groups x 8,
responses of 20-250 tokens), each variant timed interleaved with the others, median.

    python3 bench/train_lane.py --json f.json [--shape 0.5b] [--repeats 7]

- update: `GRPOTrainer.step` with AdamW's for-each kernels against its fused kernel
  (TrainerConfig.fused_adamw), and training the RMSNorm gains only (lr 0, gain_lr 1e-2:
  what the e2e runs of configs/gpu_fast.yaml train, and the floor of their asynchronous
  step, docs/RUNTIME.md). The fused and gains-only updates are profiled once each: the
  kernel table ends with the device time, to set beside the wall time (the rest is the
  host's).
- distill: `distill_rollouts` on 21 rollouts (one version's slice) as the RL section calls
  it, against the same call given the target's features and logits (what a pass the update
  already made could hand over): the share of the target's own forward pass.
Then one profile of each, the top kernels by device time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_distill import distill_rollouts  # noqa: E402
from gpu_rl import LENGTH_MULTIPLE  # noqa: E402
from gpu_timing import sync  # noqa: E402
from gpu_train import log, random_model, shape_config  # noqa: E402

from respec.engine.devices import bf16_autocast  # noqa: E402
from respec.engine.drafters.eagle import EagleHead, distill_loss  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402
from respec.rl.distill import pad_right  # noqa: E402
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rollouts", type=int, default=32, help="64: an RL step of configs/gpu_fast.yaml")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = char_tokenizer().vocab_size
    base = random_model(shape_config(args.shape, vocab, tokenizer=char_tokenizer()), device).float().eval()
    samples = rollouts(args.rollouts, vocab)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
              "rollouts": len(samples), "tokens": sum(len(s.prompt) + len(s.response) for s in samples)}
    report["update"] = update_times(base, samples, args.repeats)
    report["distill"] = distill_times(base, samples[-21:], args.repeats)
    log(json.dumps(report, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=1))


def rollouts(count: int, vocab: int) -> list[TrainSample]:
    """Prompts of 30-50 tokens, responses of 20-250 (the RL section's lengths: a median near
    90, a long tail), rewards 0/1, groups of 8."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        prompt = int(torch.randint(30, 51, (1,), generator=generator))
        length = int(min(250, 20 + torch.distributions.Exponential(1 / 70).sample().item()))
        out.append(TrainSample(torch.randint(4, vocab, (prompt,), generator=generator),
                               torch.randint(4, vocab, (length,), generator=generator),
                               torch.full((length,), -2.5), float(i % 3 == 0), str(i // 8)))
    return out


def timed(calls: dict, repeats: int, device: torch.device) -> dict:
    """Each call once to warm up, then `repeats` rounds, interleaved; median seconds."""
    for call in calls.values():
        call()
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync(device.type)
            started = time.perf_counter()
            call()
            sync(device.type)
            seconds[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(s), "all_s": s} for name, s in seconds.items()}


def update_times(base, samples, repeats: int) -> dict:
    device = next(base.parameters()).device
    configs = {"foreach_adamw": dict(lr=1e-6, fused_adamw=False), "fused_adamw": dict(lr=1e-6),
               "gains_only": dict(lr=0.0, gain_lr=1e-2)}
    trainers = {}
    for name, config in configs.items():
        model = random_model(base.config, device).float()
        model.load_state_dict(base.state_dict())
        trainers[name] = GRPOTrainer(model, TrainerConfig(micro_batch=64, length_multiple=LENGTH_MULTIPLE, **config))

    def step(trainer):
        with bf16_autocast(device):
            trainer.step(samples)

    out = timed({name: (lambda t=t: step(t)) for name, t in trainers.items()}, repeats, device)
    out["fused_over_foreach"] = out["fused_adamw"]["median_s"] / out["foreach_adamw"]["median_s"]
    log(f"update: foreach {out['foreach_adamw']['median_s'] * 1e3:.1f} ms, fused {out['fused_adamw']['median_s'] * 1e3:.1f} "
        f"ms, gains only {out['gains_only']['median_s'] * 1e3:.1f} ms")
    out["profile"] = _profile(lambda: step(trainers["fused_adamw"]), device)
    out["profile_gains_only"] = _profile(lambda: step(trainers["gains_only"]), device)
    return out


def distill_times(target, samples, repeats: int) -> dict:
    device = next(target.parameters()).device
    head = EagleHead.for_target(target).float().train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=5e-5)
    rewards = [s.reward for s in samples]
    tokens, valid = pad_right([torch.cat([s.prompt, s.response]).tolist() for s in samples], char_tokenizer().pad_id or 0)
    tokens, valid = tokens.to(device), valid.to(device)
    with torch.no_grad(), bf16_autocast(device):
        output = target(tokens, capture_layers=head.capture_layers)
        features, logits = torch.cat(output.captured, dim=-1).float(), output.logits.float()
    weights = torch.tensor([1.0 if r else 0.1 for r in rewards], device=device)

    def head_only():
        with bf16_autocast(device):
            loss = distill_loss(head, features, tokens, logits, weights=weights, valid=valid, steps=4)
        (loss / 3).backward()

    calls = {"with_target_pass": lambda: distill_rollouts(target, head, optimizer, samples, rewards, scale=1 / 3,
                                                          apply=False),
             "head_only": head_only}
    out = timed(calls, repeats, device)
    optimizer.zero_grad(set_to_none=True)
    out["target_pass_share"] = 1 - out["head_only"]["median_s"] / out["with_target_pass"]["median_s"]
    log(f"distill: with the target's pass {out['with_target_pass']['median_s'] * 1e3:.1f} ms, head only "
        f"{out['head_only']['median_s'] * 1e3:.1f} ms")
    out["profile"] = _profile(head_only, device)
    return out


def _profile(call, device: torch.device) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        sync(device.type)
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    print(table)
    return table


if __name__ == "__main__":
    main()
