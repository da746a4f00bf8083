"""Where one SD step's time goes at batch 1: drafting, the target forward, acceptance, the
KV commit, the rest of verification, and the Generator side's bookkeeping.

    python bench/sd_profile.py [HEAD_DIR] [THREADS]

The 8 first prompts of `respec bench sd`, twice, one row at a time, greedy; each piece is
timed by wrapping it in time.perf_counter (prefill not counted). docs/PERFORMANCE.md
holds the table this printed.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import respec.engine.target as target_module  # noqa: E402
from respec.bench.sd import _model_drafter, bench_prompts  # noqa: E402
from respec.engine.checkpoint import load_model  # noqa: E402
from respec.engine.drafters.base import DraftShape  # noqa: E402
from respec.engine.speculative import Sampling, SpeculativeEngine  # noqa: E402

POLICY = Path("models/tiny/policy")
SHAPES = ("nosd", "s4_t1_n4", "s3_t2_n6", "s6_t1_n6")


def main() -> None:
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    model = load_model(POLICY)
    drafter = _model_drafter(sys.argv[1] if len(sys.argv) > 1 else "models/tiny/eagle", model)
    prompts, stop = bench_prompts(POLICY, 8)
    for name in SHAPES:
        shape = None if name == "nosd" else DraftShape.parse(name)
        times, steps, tokens = profile_shape(model, drafter if shape else None, shape, prompts, stop)
        print_row(name, times, steps, tokens)


def profile_shape(model, drafter, shape, prompts, stop):
    times: dict[str, float] = defaultdict(float)
    plain_forward, plain_accept = model.forward_cached, target_module.accept
    steps = tokens = 0
    for _ in range(2):
        for prompt in prompts:
            engine = SpeculativeEngine(model, drafter, max_rows=1, max_len=len(prompt) + 100)
            engine.add([prompt], Sampling(temperature=0.0, max_new_tokens=64, stop_token_ids=stop),
                       shape.num_draft if shape else 0)
            model.forward_cached = timed(times, "target forward", plain_forward)
            target_module.accept = timed(times, "acceptance", plain_accept)
            engine.target.cache.commit = timed(times, "kv commit", engine.target.cache.commit)
            engine.book.draft = timed(times, "draft", engine.book.draft)
            engine.book.apply = timed(times, "apply", engine.book.apply)
            engine.target.verify = timed(times, "verify", engine.target.verify)
            started = time.perf_counter()
            while engine.rows:
                tokens += engine.step(shape).tokens
                steps += 1
            times["step"] += time.perf_counter() - started
            model.forward_cached, target_module.accept = plain_forward, plain_accept
    return times, steps, tokens


def timed(times: dict[str, float], name: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        times[name] += time.perf_counter() - started
        return result

    return wrapper


def print_row(name: str, times: dict[str, float], steps: int, tokens: int) -> None:
    per = {key: 1000 * value / steps for key, value in times.items()}
    verify_rest = per["verify"] - per["target forward"] - per["acceptance"] - per["kv commit"]
    print(f"{name:10s} tokens/step {tokens / steps:.2f}  ms/step {per['step']:.2f}  "
          f"tokens/s {tokens / times['step']:.0f} | draft {per.get('draft', 0):.2f} "
          f"forward {per['target forward']:.2f} accept {per['acceptance']:.2f} commit {per['kv commit']:.2f} "
          f"verify-rest {verify_rest:.2f} RowBook {per['apply']:.2f}")


if __name__ == "__main__":
    main()
