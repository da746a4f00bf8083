"""Offline synchronous GRPO on a prepared policy: how far can held-out accuracy move, and how
fast? A lab bench for the RL recipe, without the actor system (same trainer, same engine).

    python bench/grpo_offline.py --lr 5e-5 --groups 16 --steps 100 > runs/grpo_lr5e-5.jsonl

Each step poses `groups` fresh training problems (never held-out ones) G times, samples at
T=1 with respec's engine (plain decoding), scores, and takes one GRPOTrainer step. Every
`--eval-every` steps it prints the held-out accuracy (the PolicyTrainer's evaluation: 100
problems, 4 samples each at T=1, and greedy). `--make-policy` first trains a variant of the
starting policy with prepare's supervised recipe: `ls:0.1` (label smoothing 0.1) or
`guess:0.5:0.3` (half of the worked solutions replaced by a bare guess `A:<n>`, right 30% of
the time). docs/RL.md records what these runs showed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import respec.rl.sft as sft  # noqa: E402
from respec.engine.checkpoint import load_model, save_model  # noqa: E402
from respec.engine.default_model import create_default_checkpoint  # noqa: E402
from respec.engine.speculative import Sampling, SpeculativeEngine  # noqa: E402
from respec.engine.tokenizer import load_tokenizer  # noqa: E402
from respec.prepare import EVAL_SEED, TASK, TASK_PARAMS  # noqa: E402
from respec.rl.evaluate import evaluate  # noqa: E402
from respec.rl.loss import PPOConfig  # noqa: E402
from respec.rl.step_metrics import form_shares  # noqa: E402
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample  # noqa: E402
from respec.tasks import make_task  # noqa: E402


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = make_task(args.task, **(json.loads(args.task_params) if args.task_params else TASK_PARAMS))
    policy = make_policy(args.make_policy, task, args.sft_steps) if args.make_policy else args.policy
    model, tokenizer = load_model(policy), load_tokenizer(policy)
    trainer = make_trainer(model, args, policy)
    held_out = task.heldout(100, EVAL_SEED)
    skip = {p.prompt for p in held_out}
    rng, history, started = random.Random(0), [], time.perf_counter()
    emit({"step": 0, **evaluate(model, tokenizer, task, held_out, samples=4, max_new_tokens=40)})
    for step in range(1, args.steps + 1):
        samples = rollouts(model, tokenizer, task, problems(task, rng, args.groups, skip), args.G, seed=step)
        if args.shuffle_rewards:  # the control: same rewards per group, no information in who got them
            samples = shuffled_rewards(samples, args.G, random.Random(f"shuffle/{step}"))
        stats = trainer.step(samples)
        history.append((stats["reward_mean"], sum(len(s.response) for s in samples) / len(samples)))
        if step % 10 == 0:
            recent = history[-10:]
            emit({"step": step, **form_shares([task.form_of(tokenizer.decode(s.response.tolist())) for s in samples],
                                             task.forms),
                  "reward_last10": sum(r for r, _ in recent) / len(recent),
                  "response_len_last10": sum(n for _, n in recent) / len(recent),
                  "grad_norm": stats["grad_norm"], "wall_s": time.perf_counter() - started})
        if step % args.eval_every == 0:
            emit({"step": step, **evaluate(model, tokenizer, task, held_out, samples=4, max_new_tokens=40)})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="models/tiny/policy")
    parser.add_argument("--task", default=TASK, help="a built-in task (format_shift: see --task-params)")
    parser.add_argument("--task-params", default="", help='JSON, e.g. \'{"reward_format": "rare"}\' '
                                                          "(default: the embedded task's)")
    parser.add_argument("--make-policy", default="", help="ls:<smoothing> or guess:<fraction>:<right>")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--gain-lr", type=float, default=0.0, help="lr of the RMSNorm gains (0: --lr)")
    parser.add_argument("--groups", type=int, default=4, help="problems per step")
    parser.add_argument("--G", type=int, default=8, help="samples per problem")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--kl", type=float, default=0.0, help="k3 KL to the starting policy")
    parser.add_argument("--negative-scale", type=float, default=1.0, help="scale of negative advantages")
    parser.add_argument("--shuffle-rewards", action="store_true",
                        help="control: permute rewards within each group (what an update does with no signal)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--only", default="", help="train only parameters whose name contains one of these")
    return parser.parse_args()


def make_trainer(model, args, policy) -> GRPOTrainer:
    if args.only:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(any(part in name for part in args.only.split(",")))
    config = TrainerConfig(lr=args.lr, gain_lr=args.gain_lr, micro_batch=32, epochs=args.epochs, ppo=PPOConfig(kl_coef=args.kl))
    trainer = GRPOTrainer(model, config, reference=load_model(policy) if args.kl > 0 else None)
    if args.optimizer == "sgd":
        trainer.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                            momentum=0.9)
    if args.negative_scale != 1.0:
        scale_negative_advantages(args.negative_scale)
    return trainer


def scale_negative_advantages(scale: float) -> None:
    import respec.rl.trainer as trainer_module

    plain = trainer_module.group_advantages

    def scaled(*args, **kwargs):
        advantages = plain(*args, **kwargs)
        return torch.where(advantages < 0, advantages * scale, advantages)

    trainer_module.group_advantages = scaled


def problems(task, rng: random.Random, count: int, skip: set[str]) -> list:
    chosen = []
    while len(chosen) < count:
        problem = task.sample(rng)
        if problem.prompt not in skip:
            chosen.append(problem)
    return chosen


def rollouts(model, tokenizer, task, chosen: list, group_size: int, seed: int) -> list[TrainSample]:
    prompts = [torch.tensor([tokenizer.bos_id, *tokenizer.encode(p.prompt)]) for p in chosen for _ in range(group_size)]
    engine = SpeculativeEngine(model, None, max_rows=len(prompts), max_len=max(map(len, prompts)) + 42, seed=seed)
    rows = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=40, stop_token_ids=(tokenizer.eos_id,)))
    samples = []
    for index, row in enumerate(rows):
        problem = chosen[index // group_size]
        text = tokenizer.decode([t for t in row.tokens if t != tokenizer.eos_id])
        samples.append(TrainSample(prompts[index], torch.tensor(row.tokens), torch.tensor(row.logprobs),
                                   task.check(text, problem).reward, f"g{index // group_size}"))
    return samples


def shuffled_rewards(samples: list[TrainSample], group_size: int, rng: random.Random) -> list[TrainSample]:
    out = []
    for start in range(0, len(samples), group_size):
        group = samples[start : start + group_size]
        rewards = [s.reward for s in group]
        rng.shuffle(rewards)
        out += [replace(s, reward=r) for s, r in zip(group, rewards, strict=True)]
    return out


def make_policy(spec: str, task, steps: int) -> str:
    """A variant of prepare's policy (same model, same seed, same steps), trained into /tmp."""
    kind, *values = spec.split(":")
    out = Path(f"/tmp/respec-policy-{spec.replace(':', '_')}-{steps}")
    if (out / "config.json").is_file():
        return str(out)
    shutil.rmtree(out, ignore_errors=True)
    create_default_checkpoint(out, seed=0)
    model, tokenizer = load_model(out), load_tokenizer(out)
    if kind == "ls":
        sft.train_sft(model, tokenizer, task, steps, seed=0, label_smoothing=float(values[0]))
    elif kind == "guess":
        sft.train_sft(model, tokenizer, Guessing(task, float(values[0]), float(values[1])), steps, seed=0)
    else:
        raise SystemExit(f"--make-policy: unknown variant {spec!r}")
    save_model(model, out)
    return str(out)


class Guessing:
    """The task's problems with a fraction of solutions replaced by a bare guess `A:<n>`."""

    def __init__(self, task, fraction: float, right: float) -> None:
        self.task, self.fraction, self.right = task, fraction, right

    def sample(self, rng: random.Random):
        problem = self.task.sample(rng)
        if rng.random() >= self.fraction:
            return problem
        guess = int(problem.answer) + (0 if rng.random() < self.right else rng.choice([-3, -2, -1, 1, 2, 3]))
        return replace(problem, solution=f"A:{guess}")


def emit(row: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
