"""The rollout engine: continuous batching with speculative decoding (or without).

Every active row carries a *root*: its last sampled token, not yet in the KV cache. One
step drafts a tree (or nothing) per row, runs the target once over [root, nodes] of all
rows, applies the lossless acceptance rule, keeps the KV entries of the root and the
accepted nodes, and appends the accepted tokens plus the bonus token, which becomes the
next root. Plain decoding is the same step with an empty tree, so SD on and off differ
only in the drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from respec.engine.acceptance import accept
from respec.engine.drafters.base import Drafter, DraftRequest, DraftShape
from respec.engine.errors import CacheFullError
from respec.engine.kv_cache import KVCache
from respec.engine.model import CausalLM
from respec.engine.sampling import behaviour_logprobs, target_probs, validate
from respec.engine.tree import DraftTree


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Row:
    row_id: int
    slot: int
    prompt: torch.Tensor
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)  # generated so far; the last is the root
    logprobs: list[float] = field(default_factory=list)
    steps: int = 0  # verification steps this row took part in
    finish_reason: str = ""

    def history(self) -> torch.Tensor:
        return torch.cat([self.prompt, torch.tensor(self.tokens, dtype=torch.long)])


@dataclass
class StepStats:
    rows: int
    tokens: int  # emitted this step over all rows
    accepted: int  # draft tokens accepted over all rows


class SpeculativeEngine:
    def __init__(self, model: CausalLM, drafter: Drafter | None = None, max_rows: int = 16,
                 max_len: int = 512, seed: int = 0) -> None:
        self.model, self.drafter = model, drafter
        device = next(model.parameters()).device
        self.cache = KVCache(model.config, max_rows, max_len, next(model.parameters()).dtype, device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rows: dict[int, Row] = {}
        self.finished: list[Row] = []
        self._next_id = 0

    # --- admission ------------------------------------------------------------------------
    def add(self, prompts: list[torch.Tensor], sampling: Sampling, reserve: int = 0) -> list[int]:
        """Prefill rows (equal-length prompts share one pass) and sample their first token.
        `reserve`: extra cache positions a row needs for draft nodes in one step."""
        validate(sampling.temperature, sampling.top_k, sampling.top_p)
        for prompt in prompts:
            need = len(prompt) + sampling.max_new_tokens + reserve + 1
            if len(prompt) == 0 or need > self.cache.max_len:
                raise CacheFullError(f"a prompt of {len(prompt)} tokens with max_new_tokens="
                                     f"{sampling.max_new_tokens} needs {need} positions; the cache holds "
                                     f"{self.cache.max_len}")
        if len(prompts) > len(self.cache._free):
            raise CacheFullError(f"{len(prompts)} new rows but {len(self.cache._free)} free slots")
        by_length: dict[int, list[torch.Tensor]] = {}
        for prompt in prompts:
            by_length.setdefault(len(prompt), []).append(prompt.long())
        ids = []
        for group in by_length.values():
            ids += self._prefill(group, sampling)
        return ids

    def _prefill(self, prompts: list[torch.Tensor], sampling: Sampling) -> list[int]:
        rows = [Row(self._take_id(), self.cache.allocate(), p, sampling) for p in prompts]
        slots = torch.tensor([r.slot for r in rows], device=self.cache.k.device)
        tokens = torch.stack(prompts).to(self.cache.k.device)
        with torch.no_grad():
            logits = self.model.forward_cached(tokens, self.cache, slots).logits[:, -1:]
        self.cache.commit(slots, [torch.arange(tokens.shape[1])] * len(rows))
        probs = self._probs(rows, logits)
        first = torch.multinomial(probs[:, 0], 1, generator=self.generator)
        logp = self._logprobs(rows, logits, first)
        for index, row in enumerate(rows):
            self.rows[row.row_id] = row
            self._append(row, [int(first[index, 0])], [float(logp[index, 0])])
        return [row.row_id for row in rows]

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # --- one step -------------------------------------------------------------------------
    def step(self, shape: DraftShape | None = None) -> StepStats:
        rows = list(self.rows.values())
        if not rows:
            return StepStats(0, 0, 0)
        tree, draft_probs = self._draft(rows, shape)
        slots = torch.tensor([r.slot for r in rows], device=self.cache.k.device)
        roots = torch.tensor([r.tokens[-1] for r in rows], device=slots.device)
        inputs = tree.verify_tokens(roots)
        with torch.no_grad():
            logits = self.model.forward_cached(inputs, self.cache, slots, tree_mask=tree.attention_mask()).logits
        probs = self._probs(rows, logits)
        greedy = torch.tensor([r.sampling.temperature == 0 for r in rows], device=slots.device)
        result = accept(tree, probs, draft_probs, greedy=greedy, generator=self.generator)
        sources = result.source_positions()  # [B, D + 1]: root and accepted nodes, padded
        counts = result.num_tokens
        self.cache.commit(slots, [sources[b, : counts[b]] for b in range(len(rows))])
        logp = self._logprobs(rows, logits.gather(1, sources.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1])),
                              result.tokens)
        for b, row in enumerate(rows):
            count = int(counts[b])
            row.steps += 1
            self._append(row, result.tokens[b, :count].tolist(), logp[b, :count].tolist())
        return StepStats(len(rows), int(counts.sum()), int(result.num_accepted.sum()))

    def _draft(self, rows: list[Row], shape: DraftShape | None):
        if self.drafter is None or shape is None:
            return DraftTree.empty(len(rows), self.cache.k.device), None
        request = DraftRequest([r.history() for r in rows], None, [r.row_id for r in rows], shape)
        proposal = self.drafter.propose(request)
        return proposal.tree, proposal.draft_probs

    def _probs(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        params = [(r.sampling.temperature, r.sampling.top_k, r.sampling.top_p) for r in rows]
        temperature, top_k, top_p = (torch.tensor(column, device=logits.device) for column in zip(*params, strict=True))
        return target_probs(logits, temperature.float(), top_k.long(), top_p.float())

    def _logprobs(self, rows: list[Row], logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        temperature = torch.tensor([r.sampling.temperature for r in rows], device=logits.device).float()
        return behaviour_logprobs(logits, tokens, temperature)

    # --- finishing ------------------------------------------------------------------------
    def _append(self, row: Row, tokens: list[int], logprobs: list[float]) -> None:
        for token, logprob in zip(tokens, logprobs, strict=True):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in row.sampling.stop_token_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.sampling.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason:
                self._finish(row)
                return

    def _finish(self, row: Row) -> None:
        self.rows.pop(row.row_id, None)
        self.cache.free(row.slot)
        if self.drafter is not None:
            self.drafter.release_row(row.row_id)
        self.finished.append(row)

    def generate(self, prompts: list[torch.Tensor], sampling: Sampling,
                 shape: DraftShape | None = None) -> list[Row]:
        """All prompts to completion, admitting new rows as slots free up; rows in prompt order."""
        reserve = shape.num_draft if shape else 0
        waiting = list(enumerate(prompts))
        order: dict[int, int] = {}
        self.finished = []
        while waiting or self.rows:
            free = len(self.cache._free)
            if waiting and free:
                admitted, waiting = waiting[:free], waiting[free:]
                for (index, _), row_id in zip(admitted, self.add([p for _, p in admitted], sampling, reserve),
                                              strict=True):
                    order[row_id] = index
            self.step(shape)
        return sorted(self.finished, key=lambda row: order[row.row_id])
