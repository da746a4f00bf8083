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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from respec.engine.drafters.eagle import EagleHead
from respec.engine.fast.chain_step import StepConfig, _logprobs, _sample, chain_step
from respec.engine.fast.state import FastState, StaticKV, visible_up_to
from respec.engine.model import CausalLM


@dataclass(frozen=True)
class FastResult:
    tokens: list[int]  # generated tokens, up to and including a stop token
    logprobs: list[float]  # behaviour log-probabilities of those tokens
    steps: int  # verification steps (the first token comes from the prefill)
    accepted: int  # drafted tokens the target accepted


def buckets_up_to(rows: int) -> list[int]:
    """1, 2, 4, ... up to and including `rows` (which need not be a power of two)."""
    sizes = [1 << i for i in range(rows.bit_length()) if 1 << i < rows]
    return sizes + [rows]


class FastGenerator:
    """Fixed-shape generation with the policy `model` and an optional EAGLE `head`."""

    def __init__(self, model: CausalLM, head: EagleHead | None = None, max_rows: int = 64, max_len: int = 256,
                 max_new: int = 128, max_k: int = 8, temperature: float = 0.0, eos_ids: Sequence[int] = (),
                 graphs: bool | None = None) -> None:
        parameter = next(model.parameters())
        self.model, self.head, self.device = model, head, parameter.device
        self.buckets = buckets_up_to(max_rows)
        self.max_new, self.max_k, self.temperature = max_new, max_k, temperature
        self.eos_ids = tuple(eos_ids)
        self.state = FastState(model.config, max_rows, max_len, max_new + max_k + 1, parameter.dtype, self.device,
                               head_layers=1 if head is not None else 0)
        self.graphs_on = self.device.type == "cuda" if graphs is None else graphs
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs_on else None

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
            chain_step(self.model, self.head, self.state, b, self._config(k))

    def capture(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Capture CUDA graphs for (bucket, k) pairs. Warm-up steps run on the state, so this
        must happen between generations; the state is emptied afterwards."""
        missing = [pair for pair in pairs if pair not in self._graphs]
        if not self.graphs_on or not missing:
            return
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for b, k in missing:
                config = self._config(k)
                for _ in range(2):  # warm-up: lazy initialisation must not happen inside capture
                    chain_step(self.model, self.head, self.state, b, config)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    chain_step(self.model, self.head, self.state, b, config)
                self._graphs[(b, k)] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.state.reset()

    def bucket_for(self, rows: int) -> int:
        return next(size for size in self.buckets if size >= rows)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int] | Tensor], k_for_bucket: Mapping[int, int] | int = 0,
                 check_every: int = 4, compact: bool = True) -> list[FastResult]:
        """Generate up to max_new tokens for every prompt; results in prompt order.
        k_for_bucket: drafts per step, one number or per bucket size (missing: 0)."""
        if not prompts or len(prompts) > self.state.rows:
            raise ValueError(f"generate takes 1..{self.state.rows} prompts, got {len(prompts)}")
        choose = (lambda b: k_for_bucket) if isinstance(k_for_bucket, int) else (lambda b: k_for_bucket.get(b, 0))
        b = self.bucket_for(len(prompts))
        self.capture([(size, choose(size)) for size in self.buckets if size <= b])
        self.state.reset()
        with torch.no_grad():
            self.prefill(list(range(len(prompts))), prompts)
        owner = list(range(len(prompts))) + [-1] * (self.state.rows - len(prompts))  # state row -> prompt
        while True:
            for _ in range(check_every):
                self.step(b, choose(b))
            done = self.state.done[:b].tolist()  # the one host synchronisation per check
            if all(done):
                break
            if compact and self.bucket_for(done.count(False)) < b:
                b, owner = self._compact(b, done, owner)
        return self._results(owner, len(prompts))

    def _compact(self, b: int, done: list[bool], owner: list[int]) -> tuple[int, list[int]]:
        """Move the live rows to the front; returns the new bucket and row owners."""
        live = [row for row in range(b) if not done[row]]
        rest = [row for row in range(self.state.rows) if row not in set(live)]
        order = live + rest
        self.state.keep(torch.tensor(order, device=self.device))
        return self.bucket_for(len(live)), [owner[row] for row in order]

    def _results(self, owner: list[int], count: int) -> list[FastResult]:
        out, logp = self.state.out.tolist(), self.state.out_logp.tolist()
        counts, steps, accepted = (t.tolist() for t in (self.state.out_count, self.state.steps, self.state.accepted))
        results: list[FastResult | None] = [None] * count
        for row, prompt in enumerate(owner):
            if prompt < 0:
                continue
            length = min(counts[row], self.max_new)
            tokens = out[row][:length]
            stop = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
            length = length if stop is None else stop + 1
            results[prompt] = FastResult(tokens[:length], logp[row][:length], steps[row], accepted[row])
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ prefill

    def prefill(self, rows: list[int], prompts: Sequence[Sequence[int] | Tensor]) -> None:
        """Cache the prompts in state rows `rows` (one right-padded pass), sample each row's
        first token, and run the head over the prompt so drafting can start."""
        tokens, lengths = _right_padded(prompts, self.device)
        n, width = tokens.shape
        for length in lengths.tolist():
            if length + self.max_new + self.max_k + 1 > self.state.max_len:
                raise ValueError(f"a prompt of {length} tokens with max_new={self.max_new} and max_k={self.max_k} "
                                 f"does not fit max_len={self.state.max_len}")
        index = torch.tensor(rows, device=self.device)
        positions = torch.arange(width, device=self.device).expand(n, width)
        capture = self.head.capture_layers if self.head is not None else ()
        store = _scratch_store(self.state.k, n, width)
        output = self.model._run(tokens, positions, visible_up_to(positions, width + 1),
                                 StaticKV(*store, positions), capture, None)
        self.state.k[:, index, :, :width], self.state.v[:, index, :, :width] = store[0][..., :width, :], \
            store[1][..., :width, :]
        picked = torch.arange(n, device=self.device)
        logits = output.logits[picked, lengths - 1].float()[:, None]
        first = (logits[:, 0].argmax(-1) if self.temperature == 0 else
                 _sample(torch.softmax(logits[:, 0] / self.temperature, -1)))
        self._start_rows(index, lengths, first, _logprobs(logits, first[:, None], self.temperature)[:, 0])
        if self.head is not None:
            self._prefill_head(index, tokens, lengths, first, torch.cat(output.captured, dim=-1))

    def _start_rows(self, index: Tensor, lengths: Tensor, first: Tensor, logp: Tensor) -> None:
        state = self.state
        state.lengths[index], state.head_lengths[index], state.root[index] = lengths, lengths, first
        state.out[index] = 0
        state.out[index, 0], state.out_logp[index, 0] = first, logp
        state.out_count[index], state.max_new[index] = 1, self.max_new
        state.accepted[index], state.steps[index] = 0, 0
        stopped = torch.zeros_like(first, dtype=torch.bool)
        for eos in self.eos_ids:
            stopped |= first == eos
        state.done[index] = stopped | (self.max_new <= 1)

    def _prefill_head(self, index: Tensor, tokens: Tensor, lengths: Tensor, first: Tensor, features: Tensor) -> None:
        """Head position i reads (feature of prompt token i, token i + 1); the last prompt
        position reads the first sampled token, and its h is the root's."""
        n, width = tokens.shape
        picked = torch.arange(n, device=self.device)
        following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
        following[picked, lengths - 1] = first
        positions = torch.arange(width, device=self.device).expand(n, width)
        store = _scratch_store(self.state.head_k, n, width)
        hidden = self.head(self.head.fuse(features.to(self.state.root_h.dtype)), following, positions,
                           visible_up_to(positions, width + 1), StaticKV(*store, positions))
        self.state.head_k[:, index, :, :width] = store[0][..., :width, :]
        self.state.head_v[:, index, :, :width] = store[1][..., :width, :]
        self.state.root_h[index] = hidden[picked, lengths - 1]


def _right_padded(prompts: Sequence[Sequence[int] | Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if any(len(row) == 0 for row in rows):
        raise ValueError("every prompt needs at least one token")
    lengths = torch.tensor([len(row) for row in rows], device=device)
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row.to(device)
    return tokens, lengths


def _scratch_store(like: Tensor, rows: int, width: int) -> tuple[Tensor, Tensor]:
    """Empty K and V stores shaped like `like` ([layers, rows, heads, ., dim]) for `rows`
    rows of `width` positions plus a spare column (prefill writes here, then copies)."""
    shape = (like.shape[0], rows, like.shape[2], width + 1, like.shape[4])
    return like.new_zeros(shape), like.new_zeros(shape)
