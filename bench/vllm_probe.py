"""Greedy equality of the two backends on a real policy: vLLM through respec's vLLM
backend (respec.interop.vllm_engine, the engine VllmRollouts drives) against respec's own
engine, token for token, on the same weights (issue 8, docs/VLLM.md).

Runs in the vLLM venv, where respec imports too:

    make vllm-env
    .venv-vllm/bin/python bench/vllm_probe.py --model models/tiny/policy \\
        --update runs/tiny_vllm/checkpoints/step-000150/policy.safetensors --json runs/vllm_probe.json

--update then loads those weights into the running engine in place (the RL path: what a
PolicyWeights message does) and compares again with respec on the same weights. Prompts
are the arithmetic task's held-out problems, as the trainer evaluates them.
Exit status 0 when every prompt's greedy tokens are equal in both engines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from respec.engine.checkpoint import load_model
from respec.engine.speculative import SpeculativeEngine
from respec.engine.target import Sampling
from respec.engine.tokenizer import load_tokenizer
from respec.interop.vllm_engine import EngineOptions, VllmEngine
from respec.messages import SamplingParams
from respec.tasks import make_task


def prompts(model_dir: Path, count: int) -> tuple[list[list[int]], int]:
    tokenizer = load_tokenizer(model_dir)
    problems = make_task("arithmetic", max_value=9).heldout(count, 12345)
    return [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in problems], tokenizer.eos_id


def vllm_greedy(engine: VllmEngine, ids: list[list[int]], eos: int, max_new: int) -> list[dict]:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_token_ids=(eos,))
    rows = {f"r{i}": {"tokens": [], "logprobs": []} for i in range(len(ids))}
    for index, prompt in enumerate(ids):
        engine.add(f"r{index}", prompt, params)
    while engine.has_work():
        for delta in engine.step():
            rows[delta.request_id]["tokens"] += delta.tokens
            rows[delta.request_id]["logprobs"] += delta.logprobs
    return [rows[f"r{i}"] for i in range(len(ids))]


def respec_greedy(model_dir: Path, weights: Path | None, ids: list[list[int]], eos: int, max_new: int) -> list[dict]:
    model = load_model(model_dir)
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights)), strict=False)
        model.tie_weights()
    engine = SpeculativeEngine(model, None, max_rows=len(ids), max_len=256)
    rows = engine.generate([torch.tensor(p) for p in ids], Sampling(temperature=0.0, max_new_tokens=max_new,
                                                                     stop_token_ids=(eos,)))
    return [{"tokens": list(r.tokens), "logprobs": list(r.logprobs)} for r in rows]


def compare(label: str, vllm_rows: list[dict], respec_rows: list[dict]) -> dict:
    equal = [v["tokens"] == r["tokens"] for v, r in zip(vllm_rows, respec_rows, strict=True)]
    gap = max(abs(a - b) for v, r in zip(vllm_rows, respec_rows, strict=True)
              for a, b in zip(v["logprobs"], r["logprobs"], strict=False))
    tokens = sum(len(r["tokens"]) for r in respec_rows)
    print(f"[{label}] {sum(equal)}/{len(equal)} prompts equal, {tokens} tokens, max |dlogprob| {gap:.2e}")
    return {"prompts": len(equal), "equal": sum(equal), "tokens": tokens, "max_abs_dlogprob": gap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny/policy")
    parser.add_argument("--update", default="", help="a safetensors file to load in place, then compare again")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new", type=int, default=40)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    model_dir = Path(tempfile.mkdtemp(prefix="vllm_probe_")) / "policy"  # never the repo's copy
    shutil.copytree(args.model, model_dir)
    ids, eos = prompts(model_dir, args.prompts)
    started = time.perf_counter()
    engine = VllmEngine(EngineOptions(model_path=str(model_dir), max_len=256, max_rows=64))
    result = {"model": args.model, "engine_start_s": round(time.perf_counter() - started, 1)}
    result["start"] = compare("start", vllm_greedy(engine, ids, eos, args.max_new),
                              respec_greedy(model_dir, None, ids, eos, args.max_new))
    if args.update:
        engine.load_policy(args.update, 1)
        result["update"] = {"weights": args.update, **compare(
            "update", vllm_greedy(engine, ids, eos, args.max_new),
            respec_greedy(model_dir, Path(args.update), ids, eos, args.max_new))}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    parts = [result["start"]] + ([result["update"]] if args.update else [])
    return 0 if all(p["equal"] == p["prompts"] for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
