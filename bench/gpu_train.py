"""bench/gpu.py's first part: a policy of a Qwen2.5 shape trained on the built-in task,
and its EAGLE head distilled from the policy's own completions, on one GPU in minutes.

Training keeps float32 master weights under bf16 autocast; inference (everything the
benchmark times) runs a bf16 copy.
"""

from __future__ import annotations

import math
import random
import time

import torch

from respec.engine.config import ModelConfig
from respec.engine.default_model import initialise
from respec.engine.drafters.eagle import EagleHead, distill_loss
from respec.engine.fast import FastGenerator
from respec.engine.model import CausalLM
from respec.engine.tokenizer import char_tokenizer
from respec.rl.distill import pad_right
from respec.rl.sft import batch_tensors, encode_example, sft_loss

# Qwen2.5's published shapes (config.json of Qwen/Qwen2.5-{0.5B,3B,7B}-Instruct).
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, vocab_size=151936),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, head_dim=128, tie_word_embeddings=True, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, vocab_size=152064),
    # bench/sft_bucketing.py's: small enough to train on two CPU cores in a minute.
    "sft_ab": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, vocab_size=151936),
    # The shape `--smoke` runs on a CPU to check the script end to end.
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, vocab_size=151936),
}


def shape_config(name: str, vocab_size: int | None = None, tokenizer=None) -> ModelConfig:
    """The named shape, with the built-in tokenizer's vocabulary and special ids if given."""
    shape = dict(SHAPES[name])
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_id, eos_token_ids=(tokenizer.eos_id,), pad_token_id=tokenizer.pad_id)
    return ModelConfig(architecture="Qwen2ForCausalLM", rope_theta=1_000_000.0, attention_bias=True,
                       max_position_embeddings=4096, **shape, **ids)


def random_model(config: ModelConfig, device: str, dtype=torch.bfloat16, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(config)
    initialise(model)
    return model.to(dtype).eval()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_policy(task, shape: str, device: str, steps: int, batch: int = 128, lr: float = 1e-3,
                 seed: int = 0, bucket_pool: int = 1, label_smoothing: float = 0.0) -> tuple[CausalLM, dict]:
    """Supervised training on worked solutions (as `respec prepare` does for the tiny policy).
    bucket_pool > 1 cuts batches of similar length from that many batches' worth of examples:
    less padding, but a worse policy (bench/sft_bucketing.py on the CPU: 0.05-0.11 held-out
    accuracy with a pool of 16 against 0.22-0.26 with random batches, 3 seeds each), so
    batches are random by default. `label_smoothing` as `respec prepare` trains the tiny
    policy (0.1 there): better modes, a flatter T = 1 distribution, the gap RL on the norm
    gains closes (docs/RL.md)."""
    tokenizer = char_tokenizer()
    model = random_model(shape_config(shape, tokenizer.vocab_size, tokenizer), device, torch.float32, seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98), fused=device == "cuda")
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, started, losses = random.Random(seed), time.perf_counter(), []
    batches = length_bucketed(lambda: encode_example(tokenizer, *_worked(task.sample(rng))), batch, rng,
                              pool_batches=bucket_pool)
    padded = real = 0
    for step in range(steps):
        examples = next(batches)
        tokens, mask = batch_tensors(examples, tokenizer.pad_id)
        padded, real = padded + tokens.numel(), real + sum(len(ids) for ids, _ in examples)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = sft_loss(model, tokens.to(device), mask.to(device), label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
            log(f"policy step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    model.eval()
    return model, {"steps": steps, "batch": batch, "lr": lr, "bucket_pool": bucket_pool,
                   "label_smoothing": label_smoothing, "loss_first": losses[0],
                   "loss_last": losses[-1],
                   "padding_share": round(1 - real / padded, 3), "wall_s": round(time.perf_counter() - started, 1)}


def _worked(problem) -> tuple[str, str]:
    return problem.prompt, problem.solution


def length_bucketed(example, batch: int, rng: random.Random, pool_batches: int = 16):
    """Endless batches of `batch` examples (each `example()` is (ids, start)): draw
    `pool_batches` batches' worth, sort them by length, cut, and shuffle the batches. Rows of
    one batch are padded to its longest; with the long-tail task (20 to 300 tokens) random
    batches (pool_batches=1) are about 45% padding (estimated), bucketed ones a few percent
    (tested). Bucketed batches train a worse policy (see train_policy)."""
    while True:
        pool = sorted((example() for _ in range(batch * pool_batches)), key=lambda e: len(e[0]))
        batches = [pool[i: i + batch] for i in range(0, len(pool), batch)]
        rng.shuffle(batches)
        yield from batches


def generate_texts(model: CausalLM, head: EagleHead | None, prompts: list[list[int]], temperature: float,
                   max_new: int, chunk: int = 256, k: int = 0) -> list[list[int]]:
    """Completions of `prompts` with the fast path (in chunks of `chunk` rows)."""
    tokenizer = char_tokenizer()
    longest = max(len(p) for p in prompts)
    generator = FastGenerator(model, head, max_rows=min(chunk, len(prompts)), max_len=longest + max_new + 8,
                              max_new=max_new, max_k=max(k, 1) if head is not None else 0, temperature=temperature,
                              eos_ids=(tokenizer.eos_id,))
    out = []
    for start in range(0, len(prompts), chunk):
        out += [r.tokens for r in generator.generate(prompts[start:start + chunk], k)]
    return out


def accuracy(model: CausalLM, task, problems, temperature: float, max_new: int = 64) -> float:
    tokenizer = char_tokenizer()
    prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in problems]
    texts = generate_texts(model, None, prompts, temperature, max_new)
    correct = [task.check(tokenizer.decode([t for t in tokens if t != tokenizer.eos_id]), p).correct
               for tokens, p in zip(texts, problems, strict=True)]
    return sum(correct) / len(correct)


def train_head(model: CausalLM, task, device: str, steps: int, sequences: int = 4096, batch: int = 64,
               unroll: int = 4, lr: float = 1e-3, seed: int = 0, max_new: int = 128) -> tuple[EagleHead, dict]:
    """Distil an EAGLE head from `model` (bf16, frozen) on its own completions, half sampled
    at temperature 1 and half greedy, KL(policy || head) over `unroll` drafting steps."""
    tokenizer = char_tokenizer()
    started = time.perf_counter()
    rng = random.Random(f"head/{seed}")
    prompts = [[tokenizer.bos_id, *tokenizer.encode(task.sample(rng).prompt)] for _ in range(sequences)]
    half = sequences // 2
    completions = (generate_texts(model, None, prompts[:half], 1.0, max_new)
                   + generate_texts(model, None, prompts[half:], 0.0, max_new))
    sequences_ = [p + c for p, c in zip(prompts, completions, strict=True)]
    log(f"head: {len(sequences_)} completions in {time.perf_counter() - started:.0f} s")
    torch.manual_seed(seed)
    head = EagleHead.for_target(model).float().train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.05, 1 - s / max(steps, 1)))
    order, losses = random.Random(seed), []
    for step in range(steps):
        tokens, valid = pad_right(order.sample(sequences_, batch), tokenizer.pad_id or 0)
        tokens, valid = tokens.to(device), valid.to(device)
        with torch.no_grad():
            output = model(tokens, capture_layers=head.capture_layers)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = distill_loss(head, torch.cat(output.captured, dim=-1).float(), tokens, output.logits.float(),
                                valid=valid, steps=unroll)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
            log(f"head step {step + 1}/{steps}: KL {losses[-1]:.3f}")
    head = head.to(torch.bfloat16).eval()
    return head, {"steps": steps, "unroll": unroll, "sequences": len(sequences_), "kl_first": losses[0],
                  "kl_last": losses[-1], "wall_s": round(time.perf_counter() - started, 1)}
