"""`respec prepare`: the embedded default's starting point, trained from scratch on the CPU.

1. policy: the tiny Qwen2-shaped model (respec/engine/default_model.py), supervised on
   worked solutions of the built-in task until it sometimes succeeds, so RL has a signal;
2. eagle: its EAGLE-style draft head, distilled from that policy on the policy's own
   sampled completions (what it will draft during RL), KL(policy || head) per token.

Writes Hugging Face format directories `<out>/policy/` (config, safetensors, tokenizer)
and `<out>/eagle/` (the head), and `<out>/prepare.json` with what was measured. A phase
whose output exists is skipped unless `force`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from respec.engine.checkpoint import load_model, save_model
from respec.engine.default_model import create_default_checkpoint
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleHead, distill_loss
from respec.engine.model import CausalLM
from respec.engine.speculative import Sampling, SpeculativeEngine
from respec.engine.tokenizer import TextTokenizer, load_tokenizer
from respec.rl.distill import heldout_acceptance, pad_right
from respec.rl.evaluate import evaluate
from respec.rl.sft import train_sft
from respec.tasks import make_task

# The built-in task of the embedded default (configs/tiny.yaml poses the same one).
TASK = "arithmetic"
TASK_PARAMS = {"max_value": 9}
EVAL_SEED = 12345  # the held-out set the RL runs evaluate on
# Label smoothing of the supervised warm-up. Measured (docs/RL.md): 0.1 gives better modes
# (held-out greedy 0.68 vs 0.54 without) and a flat distribution at T = 1 (sampled 0.21 vs
# 0.40), which RL at T = 1 then sharpens; without it RL found nothing it could improve.
LABEL_SMOOTHING = 0.1
# The head learns from this many of the policy's own completions (half sampled, half
# greedy). Measured (docs/PERFORMANCE.md): 600 steps on 2048 completions with unroll 4
# gave greedy chain-4 acceptance 2.99 tokens per step, 300 steps on 256 gave 2.56.
HEAD_SEQUENCES = 2048


def prepare(out_dir: str | Path = "models/tiny", sft_steps: int = 600, eagle_steps: int = 600,
            seed: int = 0, force: bool = False, threads: int = 0, head_sequences: int = HEAD_SEQUENCES,
            task_name: str = TASK, task_params: dict | None = None, head_sampled: float = 0.5) -> dict:
    """`task_name`/`task_params` pick the task the policy is supervised on and the head's
    prompts come from (another built-in task, or the same one with other parameters: e.g.
    `format_shift`, the staleness bench's variant); the default is the embedded one.
    `head_sampled`: the share of the head's training completions sampled at T = 1, the rest
    greedy (less: the head sees less of what the policy only samples now and then)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    report_path = out / "prepare.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() and not force else {}
    task = make_task(task_name, **(TASK_PARAMS if task_params is None else task_params))
    report["task"] = {"name": task_name, "params": TASK_PARAMS if task_params is None else task_params}
    policy_dir, eagle_dir = out / "policy", out / "eagle"
    if force or not (policy_dir / "config.json").is_file():
        report["policy"] = _train_policy(policy_dir, task, sft_steps, seed)
        shutil.rmtree(eagle_dir, ignore_errors=True)  # a head belongs to one policy
    if force or not (eagle_dir / "eagle_head.json").is_file():
        report["eagle"] = _train_head(policy_dir, eagle_dir, task, eagle_steps, seed, head_sequences, head_sampled)
    report_path.write_text(json.dumps(report, indent=2))
    return report


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=Console(stderr=True))


def _train_policy(policy_dir: Path, task, steps: int, seed: int) -> dict:
    started = time.perf_counter()
    staging = policy_dir.with_name(policy_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    create_default_checkpoint(staging, seed=seed)
    model, tokenizer = load_model(staging), load_tokenizer(staging)
    with _progress() as progress:
        bar = progress.add_task("policy: supervised warm-up", total=steps, note="")
        losses = train_sft(model, tokenizer, task, steps, seed=seed, label_smoothing=LABEL_SMOOTHING,
                           on_step=lambda step, loss: progress.update(bar, advance=1, note=f"loss {loss:.3f}"))
    accuracy = evaluate(model, tokenizer, task, task.heldout(100, EVAL_SEED), samples=2, max_new_tokens=40)
    save_model(model, staging)
    shutil.rmtree(policy_dir, ignore_errors=True)
    staging.rename(policy_dir)
    return {"steps": steps, "label_smoothing": LABEL_SMOOTHING, "loss_first": losses[0], "loss_last": losses[-1],
            **accuracy, "wall_s": round(time.perf_counter() - started, 1)}


def _train_head(policy_dir: Path, eagle_dir: Path, task, steps: int, seed: int, sequences: int = HEAD_SEQUENCES,
                sampled: float = 0.5,
                batch: int = 32, unroll: int = 4) -> dict:
    """Distil the head; `unroll` drafting steps are trained at once (EAGLE-3's training-time
    test, ``distill_loss(steps=...)``). Measured at 300 steps on 256 completions: greedy
    chain-4 acceptance 1.75 tokens per step with unroll=1, 2.56 with unroll=4."""
    started = time.perf_counter()
    model, tokenizer = load_model(policy_dir), load_tokenizer(policy_dir)
    torch.manual_seed(seed)
    head = EagleHead.for_target(model)
    rows = _policy_rows(model, tokenizer, task, count=sequences, seed=seed, sampled=sampled)
    completions = [prompt + response for prompt, response in rows]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.05, 1 - s / max(steps, 1)))
    rng, losses = random.Random(seed), []
    with _progress() as progress:
        bar = progress.add_task("eagle head: distillation", total=steps, note="")
        for _ in range(steps):
            tokens, valid = pad_right(rng.sample(completions, min(batch, len(completions))), tokenizer.pad_id or 0)
            with torch.no_grad():
                output = model(tokens, capture_layers=head.capture_layers)
            loss = distill_loss(head, torch.cat(output.captured, dim=-1), tokens, output.logits, valid=valid,
                                steps=unroll)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            progress.update(bar, advance=1, note=f"KL {losses[-1]:.3f}")
    head.save(eagle_dir)
    return {"steps": steps, "unroll": unroll, "sequences": len(completions), "sampled": sampled, **_form_shares(tokenizer, task, rows),
            "kl_first": losses[0], "kl_last": losses[-1],
            "accept_len_s4": _acceptance(model, tokenizer, head, task), "wall_s": round(time.perf_counter() - started, 1)}


def _policy_completions(model: CausalLM, tokenizer: TextTokenizer, task, count: int, seed: int) -> list[list[int]]:
    """Prompt + the policy's own sampled completion, `count` of them (half greedy)."""
    return [prompt + response for prompt, response in _policy_rows(model, tokenizer, task, count, seed)]


def _policy_rows(model: CausalLM, tokenizer: TextTokenizer, task, count: int, seed: int,
                 sampled: float = 0.5) -> list[tuple[list[int], list[int]]]:
    """(prompt, the policy's completion) token lists, `count` of them: the `sampled` share
    sampled at T = 1, the rest greedy."""
    rng = random.Random(f"eagle/{seed}")
    prompts = [torch.tensor([tokenizer.bos_id, *tokenizer.encode(task.sample(rng).prompt)]) for _ in range(count)]
    rows = []
    split = round(count * sampled)
    for temperature, part in ((1.0, prompts[:split]), (0.0, prompts[split:])):
        if not part:
            continue
        engine = SpeculativeEngine(model, None, max_rows=64, max_len=96, seed=seed)
        done = engine.generate(part, Sampling(temperature, max_new_tokens=48, stop_token_ids=(tokenizer.eos_id,)))
        rows += [(row.prompt.tolist(), row.tokens) for row in done]
    return rows


def _form_shares(tokenizer: TextTokenizer, task, rows: list[tuple[list[int], list[int]]]) -> dict:
    """Share of each response layout among the head's training completions, for tasks that
    tell layouts apart (format_shift: how much of the rare format the head saw)."""
    forms = [task.form_of(tokenizer.decode([t for t in response if t != tokenizer.eos_id])) for _, response in rows]
    if not any(forms):
        return {}
    return {"form_shares": {form: round(forms.count(form) / len(forms), 4) for form in sorted(set(forms))}}


def _acceptance(model: CausalLM, tokenizer: TextTokenizer, head: EagleHead, task, count: int = 32) -> float:
    """Mean tokens per verification step, greedy, chain of 4, on held-out prompts."""
    prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in task.heldout(count, EVAL_SEED)]
    return round(heldout_acceptance(model, head, prompts, DraftShape.chain(4), 48, (tokenizer.eos_id,)), 3)
