"""bench/gpu.py's RL part: synchronous GRPO steps on one GPU, rollouts by the fast path.

Two variants from the same weights and the same prompts per step:

- ``sync_nosd``: generate (no drafting), score, one GRPO update;
- ``respec``: generate with the scheduler's per-bucket draft lengths, score, one GRPO
  update, and every third step distil the head on the latest 256 rollouts (reward-weighted KL, the DraftDistiller's update_interval 3) so it follows
  the policy.

Both are synchronous in one process (no overlap of generation and training: on one GPU
they would share the device anyway). A step's time is generation + update (+ distillation).
"""

from __future__ import annotations

import copy
import random
import time

import torch

from respec.engine.drafters.eagle import EagleHead, distill_loss
from respec.engine.fast import FastGenerator
from respec.engine.model import CausalLM
from respec.engine.tokenizer import char_tokenizer
from respec.rl.distill import pad_right
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample

DISTILL_SAMPLES = 256  # rollouts per distillation: the latest ones (one pass, batches of 128)


def rl_section(model: CausalLM, head: EagleHead, task, choice: dict[int, int], steps: int, groups: int,
               group_size: int, max_new: int, lr: float, log) -> dict:
    out = {}
    for variant in ("sync_nosd", "respec"):
        out[variant] = run_variant(variant, model, head, task, choice, steps, groups, group_size, max_new, lr, log)
    base = sum(s["step_s"] for s in out["sync_nosd"]["steps"])
    ours = sum(s["step_s"] for s in out["respec"]["steps"])
    out["respec_step_time_over_sync_nosd"] = ours / base
    return out


def run_variant(variant: str, model: CausalLM, head: EagleHead, task, choice, steps: int, groups: int,
                group_size: int, max_new: int, lr: float, log, distill_every: int = 3) -> dict:
    tokenizer = char_tokenizer()
    infer = copy.deepcopy(model)  # bf16: what generates
    master = copy.deepcopy(model).float().train()  # float32: what trains
    trainer = GRPOTrainer(master, TrainerConfig(lr=lr, micro_batch=64))
    drafting = variant == "respec"
    draft = _head_for(infer, head) if drafting else None
    draft_master = _head_for(infer, head).float().train() if drafting else None
    draft_optimizer = torch.optim.AdamW(draft_master.parameters(), lr=3e-4) if drafting else None
    rows = groups * group_size
    generator = FastGenerator(infer, draft, max_rows=rows, max_len=48 + max_new + 8, max_new=max_new,
                              max_k=6 if drafting else 0, temperature=1.0, eos_ids=(tokenizer.eos_id,))
    k_for_bucket = choice if drafting else 0
    history, buffer = [], []
    for step in range(steps + 1):  # step 0 warms up (graph capture) and is not reported
        problems = [task.sample(random.Random(f"rl/{step}/{g}")) for g in range(groups)]
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in problems for _ in range(group_size)]
        _sync(infer)
        started = time.perf_counter()
        results = generator.generate(prompts, k_for_bucket)
        _sync(infer)
        generated = time.perf_counter()
        rewards = [task.check(tokenizer.decode([t for t in r.tokens if t != tokenizer.eos_id]),
                              problems[i // group_size]).reward for i, r in enumerate(results)]
        samples = [TrainSample(torch.tensor(p), torch.tensor(r.tokens), torch.tensor(r.logprobs), reward, str(i // group_size))
                   for i, (p, r, reward) in enumerate(zip(prompts, results, rewards, strict=True))]
        with _autocast(next(master.parameters()).device):
            trainer.step(samples)
        _copy_weights(master, infer)
        _sync(infer)
        trained = time.perf_counter()
        buffer += samples
        if drafting and step % distill_every == 0:  # as the DraftDistiller's update_interval
            recent = buffer[-DISTILL_SAMPLES:]
            distill(infer, draft_master, draft_optimizer, recent, [s.reward for s in recent])
            _copy_weights(draft_master, draft)
            buffer = []
        generator.refresh_weights()
        _sync(infer)
        done = time.perf_counter()
        record = {"step": step, "reward": sum(rewards) / len(rewards), "gen_s": generated - started,
                  "train_s": trained - generated, "distill_s": done - trained, "step_s": done - started,
                  "tokens": sum(len(r.tokens) for r in results),
                  "accepted_per_step": sum(r.accepted for r in results) / max(1, sum(r.steps for r in results))}
        if step:
            history.append(record)
        log(f"rl {variant} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step"))
    return {"steps": history, "reward_first": history[0]["reward"], "reward_last": history[-1]["reward"],
            "reward_mean": sum(s["reward"] for s in history) / len(history)}


def _sync(model: CausalLM) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _head_for(target: CausalLM, trained: EagleHead) -> EagleHead:
    head = EagleHead.for_target(target, trained.capture_layers)
    head.load_state_dict(trained.state_dict())
    return head.eval()


def _copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """In place (the fast path's graphs read these tensors), cast to the target's dtype."""
    with torch.no_grad():
        for ours, theirs in zip(target.parameters(), source.parameters(), strict=True):
            ours.copy_(theirs)


def distill(target: CausalLM, head: EagleHead, optimizer, samples: list[TrainSample], rewards: list[float],
            batch: int = 128, unroll: int = 4) -> None:
    """One pass over the buffered rollouts, each weighted by its reward over the mean reward
    (the DraftDistiller's "reward" weighting, clipped to [0.1, 5])."""
    device = next(target.parameters()).device
    mean = sum(rewards) / len(rewards)
    weights = torch.tensor([r / mean if mean > 0 else 1.0 for r in rewards]).clamp(0.1, 5.0)
    sequences = [torch.cat([s.prompt, s.response]).tolist() for s in samples]
    for start in range(0, len(sequences), batch):
        tokens, valid = pad_right(sequences[start:start + batch], char_tokenizer().pad_id or 0)
        tokens, valid = tokens.to(device), valid.to(device)
        with torch.no_grad():
            output = target(tokens, capture_layers=head.capture_layers)
        with _autocast(device):
            loss = distill_loss(head, torch.cat(output.captured, dim=-1).float(), tokens, output.logits.float(),
                                weights=weights[start:start + batch].to(device), valid=valid, steps=unroll)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
