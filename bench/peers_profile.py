"""Where the time goes in one `respec bench peers` cell, on each side.

    PYTHONPATH=. /tmp/vllm-venv/bin/python bench/peers_profile.py --batch 64 --mode nosd

Runs the bench's prompts at one batch size through respec's engine and through vLLM (same
settings as the bench: equal threads, warm-up first), each under the torch profiler: respec
in this process, vLLM in its worker process (vLLM's own profiler hook, which writes the
worker's op table). Prints wall time, verification steps (respec) and the ops with the most
self CPU time on each side; wall minus op time is the engine's host-side overhead (Python,
scheduling, inter-process messages).
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time
from pathlib import Path

import torch

from respec.bench.peers import Settings, _drafter, _respec_runner
from respec.bench.peers_vllm import VllmSide, configure_cpu, speculative_config
from respec.bench.sd import bench_prompts
from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.speculative import Sampling


def respec_side(args, model, prompts, stop) -> None:
    settings = Settings(args.model, args.eagle, args.eagle3, k=args.k)
    chunks = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    max_len = max(len(p) for p in prompts) + args.max_new_tokens + args.k + 2
    shape = None if args.mode == "nosd" else DraftShape.chain(args.k)
    run = _respec_runner(model, _drafter(args.mode, model, settings), shape, args.batch, max_len,
                         Sampling(0.0, max_new_tokens=args.max_new_tokens, stop_token_ids=stop))
    run(chunks[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        started = time.perf_counter()
        results = [run(chunk) for chunk in chunks]
        wall = time.perf_counter() - started
    tokens, steps = sum(len(t) for out, _ in results for t in out), sum(s for _, s in results)
    print(f"respec {args.mode} batch {args.batch}: {wall:.3f} s wall, {tokens} tokens, {steps} row-steps "
          f"(profiled: slower than the bench)")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def vllm_side(args, prompts, stop) -> None:
    method = {"nosd": None, "sd_ngram": "ngram"}.get(args.mode, "eagle3")
    out = tempfile.mkdtemp(prefix="peers_profile_")
    vllm = VllmSide(args.model, "cpu", 512, speculative_config(method, args.k, args.eagle3),
                    profiler_config={"profiler": "torch", "torch_profiler_dir": out,
                                     "torch_profiler_with_stack": False})
    ids = [p.tolist() for p in prompts]
    chunks = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
    vllm.generate(chunks[0], args.max_new_tokens, stop)
    vllm.llm.start_profile()
    started = time.perf_counter()
    tokens = sum(len(t) for chunk in chunks for t in vllm.generate(chunk, args.max_new_tokens, stop))
    wall = time.perf_counter() - started
    vllm.llm.stop_profile()
    time.sleep(2)
    print(f"vLLM {method or 'nosd'} batch {args.batch}: {wall:.3f} s wall, {tokens} tokens (profiled)")
    for table in glob.glob(f"{out}/*profiler_out*.txt"):
        print(table)
        print("\n".join(Path(table).read_text().splitlines()[: args.rows + 6]))
    vllm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny/policy")
    parser.add_argument("--eagle", default="models/tiny/eagle")
    parser.add_argument("--eagle3", default="runs/peers_eagle3_head")
    parser.add_argument("--mode", default="nosd", choices=("nosd", "sd_ngram", "sd_eagle3", "sd_eagle"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--side", default="both", choices=("both", "respec", "vllm"))
    args = parser.parse_args()
    configure_cpu(args.threads)
    torch.set_num_threads(args.threads)
    prompts, stop = bench_prompts(Path(args.model), args.prompts)
    if args.side in ("both", "respec"):
        respec_side(args, load_model(Path(args.model)), prompts, stop)
    if args.side in ("both", "vllm"):
        vllm_side(args, prompts, stop)


if __name__ == "__main__":
    main()
