"""The fast path's host side: prefill, CUDA-graph capture per (batch bucket, draft length),
and a generation loop that talks to the device once every few steps.

    generator = FastGenerator(model, head, max_rows=64, max_len=256, max_new=128)
    results = generator.generate(prompts, k_for_bucket={64: 0, 8: 3, 1: 5})

Rows live in batch buckets (powers of two). A step runs on the smallest bucket that holds
the live rows; when rows finish, the live ones are moved to the front and the next smaller
bucket's graph takes over, so the long tail of a batch runs at its own size, where
drafting pays (``k_for_bucket``: the draft length per bucket, a scheduler's choice).

On a CPU (or with ``graphs=False``) the same steps run eagerly: that is how the tests
check the fast path against the reference engine without a GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from respec.engine.drafters.eagle import EagleHead
from respec.engine.fast.chain_step import StepConfig, chain_step
from respec.engine.fast.fused import FusedHead, FusedModel
from respec.engine.fast.kernel_layer import kernels_usable
from respec.engine.fast.prefill import prefill_rows
from respec.engine.fast.state import FastState
from respec.engine.model import CausalLM


@dataclass(frozen=True)
class FastResult:
    tokens: list[int]  # generated tokens, up to and including a stop token
    logprobs: list[float]  # behaviour log-probabilities of those tokens
    steps: int  # verification steps (the first token comes from the prefill)
    accepted: int  # drafted tokens the target accepted


PREFILL_WIDTH_STEP = 16  # prompts are right-padded to a multiple of this: few prefill graphs


def buckets_up_to(rows: int) -> list[int]:
    """1, 2, 4, ... up to and including `rows` (which need not be a power of two)."""
    sizes = [1 << i for i in range(rows.bit_length()) if 1 << i < rows]
    return sizes + [rows]


class FastGenerator:
    """Fixed-shape generation with the policy `model` and an optional EAGLE `head`.
    After the policy's or the head's weights change, call ``refresh_weights``."""

    def __init__(self, model: CausalLM, head: EagleHead | None = None, max_rows: int = 64, max_len: int = 256,
                 max_new: int = 128, max_k: int = 8, temperature: float = 0.0, eos_ids: Sequence[int] = (),
                 graphs: bool | None = None, kernels: bool | None = None) -> None:
        parameter = next(model.parameters())
        self.model, self.head, self.device = model, head, parameter.device
        # Triton kernels for passes of a few tokens: by default wherever they run (CUDA, bf16).
        self.kernels_on = kernels_usable(self.device, parameter.dtype) if kernels is None else kernels
        self.fused = FusedModel(model, self.kernels_on)
        self.fused_head = FusedHead(head, self.kernels_on) if head is not None else None
        self.buckets = buckets_up_to(max_rows)
        self.max_new, self.max_k, self.temperature = max_new, max_k if head is not None else 0, temperature
        self.eos_ids = tuple(eos_ids)
        self.state = FastState(model.config, max_rows, max_len, max_new + max_k + 1, parameter.dtype, self.device,
                               head_layers=1 if head is not None else 0)
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs_on else None
        self.chains: dict[int, int] = {}  # after generate: draft length -> row-steps that drafted that many
        self.steps_taken = 0  # after generate: the steps it ran (the longest row's; a batch's time is about these)

    def refresh_weights(self) -> None:
        """Re-read the model's (and head's) weights into the fused copies, in place."""
        self.fused.refresh()
        if self.fused_head is not None:
            self.fused_head.refresh()

    # ------------------------------------------------------------------ steps

    def _config(self, k: int) -> StepConfig:
        if k and self.head is None:
            raise ValueError(f"draft length {k} needs a draft head; this generator has none")
        if not 0 <= k <= self.max_k:
            raise ValueError(f"draft length must be in [0, {self.max_k}], got {k}")
        return StepConfig(k, self.temperature, self.eos_ids)

    def step(self, b: int, k: int) -> None:
        """One step of rows 0..b-1 (a bucket size) with k drafts, replayed if captured."""
        graph = self._graphs.get((b, k))
        if graph is not None:
            graph.replay()
            return
        with torch.no_grad():
            chain_step(self.fused, self.fused_head, self.state, b, self._config(k))

    def capture(self, pairs: Sequence[tuple[int, int]], prefill: tuple[int, int] | None = None) -> None:
        """Capture CUDA graphs for (bucket, k) steps and a (bucket, width) prefill. Warm-ups
        run on the state, so this happens between generations; the state is emptied before
        (a previous generation's prompts may be longer than this prefill's width) and after."""
        steps = [pair for pair in pairs if pair not in self._graphs]
        prefills = [prefill] if prefill is not None and prefill not in self._prefill_graphs else []
        if not self.graphs_on or not (steps or prefills):
            return
        for k in {k for _, k in steps}:
            self._config(k)  # refuse a bad k before anything is captured
        work = [(self._graphs, pair, lambda b=pair[0], k=pair[1]: chain_step(
            self.fused, self.fused_head, self.state, b, self._config(k))) for pair in steps]
        work += [(self._prefill_graphs, pair, lambda b=pair[0], width=pair[1]: prefill_rows(
            self.fused, self.fused_head, self.state, b, width, self.max_new, self._config(0))) for pair in prefills]
        torch.cuda.synchronize()
        self.state.reset()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for table, key, run in work:
                for _ in range(2):  # warm-up: lazy initialisation must not happen inside capture
                    run()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    run()
                table[key] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.state.reset()

    def time_step(self, b: int, k: int, steps: int = 20, repeats: int = 3) -> float:
        """Seconds per step of bucket b with k drafts (a graph replay where graphs are on),
        the median of `repeats` runs of `steps` steps over b rows that never finish. A step
        costs the same whatever its tokens, so this is the cost a scheduler weighs against
        the drafts it expects accepted. Leaves the state empty."""
        prompts = [[token % self.model.config.vocab_size for token in range(1, 9)]] * b
        self.capture([(b, k)], (b, self._prefill_width(prompts)))
        self.start(prompts)
        self.state.done[:b] = False
        self.state.max_new[:b] = 10**9  # every step does full work (writes past the buffers land in its spare column)
        for _ in range(3):
            self.step(b, k)
        times = []
        for _ in range(repeats):
            self._sync()
            started = time.perf_counter()
            for _ in range(steps):
                self.step(b, k)
            self._sync()
            times.append((time.perf_counter() - started) / steps)
        self.state.reset()
        return statistics.median(times)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bucket_for(self, rows: int) -> int:
        return next(size for size in self.buckets if size >= rows)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int] | Tensor], k_for_bucket: Mapping[int, int] | int = 0,
                 check_every: int = 1, compact: bool = True,
                 max_new: Sequence[int] | None = None) -> list[FastResult]:
        """Generate up to max_new tokens for every prompt; results in prompt order.
        k_for_bucket: drafts per step, one number or per bucket size (missing: 0).
        max_new: each prompt's own limit (1..the generator's max_new), if not the generator's."""
        if not prompts or len(prompts) > self.state.rows:
            raise ValueError(f"generate takes 1..{self.state.rows} prompts, got {len(prompts)}")
        if max_new is not None and (len(max_new) != len(prompts) or not all(1 <= m <= self.max_new for m in max_new)):
            raise ValueError(f"max_new needs one limit in [1, {self.max_new}] per prompt, got {list(max_new)}")
        choose = (lambda b: k_for_bucket) if isinstance(k_for_bucket, int) else (lambda b: k_for_bucket.get(b, 0))
        b = self.bucket_for(len(prompts))
        self.capture([(size, choose(size)) for size in self.buckets if size <= b], (b, self._prefill_width(prompts)))
        b = self.start(prompts)
        if max_new is not None:  # after the prefill, which set the generator's limit and sampled a first token
            limits = self.state.max_new[: len(prompts)]
            limits.copy_(torch.as_tensor(list(max_new)), non_blocking=True)
            self.state.done[: len(prompts)] |= limits <= 1
        owner = list(range(len(prompts))) + [-1] * (self.state.rows - len(prompts))  # state row -> prompt
        self.chains, self.steps_taken = {}, 0
        live = self.state.done[:b].tolist().count(False)  # rows not done before the next step (as of the last check)
        while True:
            for _ in range(check_every):
                k = choose(b)
                self.step(b, k)
                self.chains[k] = self.chains.get(k, 0) + live
                self.steps_taken += 1
            done = self.state.done[:b].tolist()  # the one host synchronisation per check
            live = done.count(False)
            if live == 0:
                break
            if compact and self.bucket_for(live) < b:
                b, owner = self._compact(b, done, owner)
        return self._results(owner, len(prompts))

    def _compact(self, b: int, done: list[bool], owner: list[int]) -> tuple[int, list[int]]:
        """Move the live rows to the front; returns the new bucket and row owners."""
        live = [row for row in range(b) if not done[row]]
        taken = set(live)
        rest = [row for row in range(self.state.rows) if row not in taken]
        order = live + rest
        self.state.keep(torch.tensor(order, device=self.device), live=len(live))
        return self.bucket_for(len(live)), [owner[row] for row in order]

    def _results(self, owner: list[int], count: int) -> list[FastResult]:
        out, logp = self.state.out.tolist(), self.state.out_logp.tolist()
        counts, steps, accepted, limits = (t.tolist() for t in (self.state.out_count, self.state.steps,
                                                                self.state.accepted, self.state.max_new))
        results: list[FastResult | None] = [None] * count
        for row, prompt in enumerate(owner):
            if prompt < 0:
                continue
            length = min(counts[row], limits[row])
            tokens = out[row][:length]
            stop = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
            length = length if stop is None else stop + 1
            results[prompt] = FastResult(tokens[:length], logp[row][:length], steps[row], accepted[row])
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ prefill

    def _prefill_width(self, prompts: Sequence[Sequence[int] | Tensor]) -> int:
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if longest + self.max_new + self.max_k + 1 > self.state.max_len:
            raise ValueError(f"a prompt of {longest} tokens with max_new={self.max_new} and max_k={self.max_k} "
                             f"does not fit max_len={self.state.max_len}")
        return min(-(-longest // PREFILL_WIDTH_STEP) * PREFILL_WIDTH_STEP, self.state.max_len)

    def start(self, prompts: Sequence[Sequence[int] | Tensor]) -> int:
        """Empty the state and prefill `prompts` into rows 0..n-1 (one pass, replayed from a
        graph where captured); returns the bucket that holds them. Rows n..b-1 are done."""
        width = self._prefill_width(prompts)
        b = self.bucket_for(len(prompts))
        self.state.reset()
        self.state.load_prompts(prompts, b)
        graph = self._prefill_graphs.get((b, width))
        if graph is not None:
            graph.replay()
        else:
            with torch.no_grad():
                prefill_rows(self.fused, self.fused_head, self.state, b, width, self.max_new, self._config(0))
        return b
