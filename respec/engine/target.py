"""The target side of speculative decoding: the policy weights, the KV cache, acceptance.

It knows slots, not rows: prefill prompts into free slots, verify a draft tree per slot
in one forward pass, keep what the lossless rule accepts. What to draft and when a row
ends is the caller's business (the Generator, or `SpeculativeEngine` in one process).

Each slot samples from its row's own stream (``respec.engine.sampling.RowStreams``),
keyed at prefill: by the caller (the Verifier keys a row by its prompt id, so a sample
posed again regenerates the same tokens in any process), else by the runner's seed and
how many rows it opened before (reproducible for one process's sequence of calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respec.engine.acceptance import accept
from respec.engine.admission import check_fits
from respec.engine.copy_in import copy_in
from respec.engine.errors import CacheFullError
from respec.engine.feature_rebuild import committed_features
from respec.engine.kv_cache import KVCache
from respec.engine.model import CausalLM
from respec.engine.sampling import (
    RowStreams,
    behaviour_logprobs,
    sample_inverse_cdf,
    stream_key,
    target_probs,
)
from respec.engine.tree import DraftTree


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Verified:
    """Per slot, in request order: tokens[b, :num_tokens[b]] are accepted drafts + bonus."""

    tokens: torch.Tensor  # long [B, D + 1], -1 past the end
    logprobs: torch.Tensor  # float [B, D + 1] behaviour log-probabilities of those tokens
    num_tokens: torch.Tensor  # long [B]
    num_accepted: torch.Tensor  # long [B]
    # With TargetRunner.capture_layers: the captured hidden states, concatenated over the
    # layers ([..., len(capture_layers) * hidden]), at the positions whose KV was kept.
    # prefill: [B, T, F] for every prompt token; verify: [B, D + 1, F] for the root and the
    # accepted nodes, valid for the first num_tokens[b] entries (zeros past them).
    features: torch.Tensor | None = None


class TargetRunner:
    def __init__(self, model: CausalLM, max_rows: int, max_len: int, seed: int = 0,
                 capture_layers: tuple[int, ...] = ()) -> None:
        parameter = next(model.parameters())
        self.model = model
        self.capture_layers = tuple(capture_layers)  # layers whose hidden states a drafter reads
        self.cache = KVCache(model.config, max_rows, max_len, parameter.dtype, parameter.device)
        self.device = parameter.device
        self.seed = seed
        self.stream_keys = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # slot -> its row's key
        self.rows_opened = 0
        self.version = 0

    @property
    def free_slots(self) -> int:
        return len(self.cache._free)

    def check_admission(self, prompt_len: int, sampling: Sampling, reserve: int) -> None:
        check_fits(prompt_len, sampling, self.cache.max_len, reserve)

    def prefill(self, prompts: list[torch.Tensor], sampling: list[Sampling],
                streams: list[int] | None = None) -> tuple[list[int], Verified]:
        """Equal-length prompts in one pass; returns their slots and first sampled tokens.
        `streams`: each row's stream key (``stream_key``); default: from the seed and the
        number of rows opened before."""
        if len(prompts) > self.free_slots:
            raise CacheFullError(f"{len(prompts)} new rows but {self.free_slots} free slots")
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prefill takes prompts of one length; group them first")
        slots = torch.tensor([self.cache.allocate() for _ in prompts], device=self.device)
        tokens = torch.stack([p.long() for p in prompts]).to(self.device)
        with torch.no_grad():
            output = self.model.forward_cached(tokens, self.cache, slots, capture_layers=self.capture_layers)
        logits = output.logits[:, -1:]
        self.cache.commit(slots, [torch.arange(tokens.shape[1])] * len(prompts))
        if streams is None:
            streams = [stream_key(self.seed, f"row/{self.rows_opened + i}") for i in range(len(prompts))]
        self.rows_opened += len(prompts)
        self.stream_keys[slots] = torch.tensor(streams, dtype=torch.long, device=self.device)
        u = self._streams(slots, first_position=self.cache.lengths[slots]).uniforms(1, 1)[:, 0, 0]
        first = sample_inverse_cdf(self._probs(sampling, logits)[:, 0], u)[:, None]
        logp = self._logprobs(sampling, logits, first)
        ones = torch.ones(len(prompts), dtype=torch.long, device=self.device)
        return slots.tolist(), Verified(first, logp, ones, ones * 0, _concat_features(output.captured))

    def verify(self, slots: list[int], roots: torch.Tensor, tree: DraftTree,
               draft_probs: torch.Tensor | None, sampling: list[Sampling]) -> Verified:
        """One target pass over [root, nodes] of every slot, the acceptance rule, the KV commit."""
        slot_ids = torch.tensor(slots, device=self.device)
        # the first token decided follows the root, which sits at the row's cache length
        streams = self._streams(slot_ids, first_position=self.cache.lengths[slot_ids] + 1)
        inputs = tree.verify_tokens(roots.to(self.device))
        with torch.no_grad():
            # A chain is causal: no tree mask to build (a few dozen small ops per step).
            tree_mask = None if tree.is_chain() else tree.attention_mask()
            output = self.model.forward_cached(inputs, self.cache, slot_ids, tree_mask=tree_mask,
                                               capture_layers=self.capture_layers)
        logits = output.logits
        result = self._accept(tree, logits, draft_probs, sampling, streams)
        sources = result.source_positions()  # the root and the accepted nodes: their KV stays
        counts = result.num_tokens
        self.cache.commit(slot_ids, sources)  # [B, D + 1], -1 past each row's kept entries
        at_sources = logits.gather(1, sources.clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
        return Verified(result.tokens, self._logprobs(sampling, at_sources, result.tokens), counts,
                        result.num_accepted, _kept_features(output.captured, sources))

    def committed_features(self, spans: list[tuple[int, torch.Tensor, int]],
                           layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Per (slot, tokens, first position) span of committed history: the features of
        `layers` there, [len(tokens), F], recomputed from the cache (nothing written)."""
        width = max(len(tokens) for _, tokens, _ in spans)
        # padding columns repeat a row's last real position: valid to read, never returned
        offsets = torch.arange(width)
        positions = torch.stack([first + offsets.clamp(max=len(tokens) - 1) for _, tokens, first in spans])
        tokens = torch.stack([tokens[offsets.clamp(max=len(tokens) - 1)] for _, tokens, _ in spans])
        slots = torch.tensor([slot for slot, _, _ in spans], device=self.device)
        with torch.no_grad():
            features = committed_features(self.model, self.cache, slots, tokens.to(self.device),
                                          positions.to(self.device), layers)
        return [features[b, : len(span_tokens)] for b, (_, span_tokens, _) in enumerate(spans)]

    def _streams(self, slots: torch.Tensor, first_position: torch.Tensor) -> RowStreams:
        return RowStreams(self.stream_keys[slots], first_position)

    def _accept(self, tree: DraftTree, logits: torch.Tensor, draft_probs: torch.Tensor | None,
                sampling: list[Sampling], streams: RowStreams):
        greedy = [s.temperature == 0 for s in sampling]
        if all(greedy):
            # Greedy acceptance reads only the argmax of the target's distribution, which is
            # the logits' argmax (acceptance takes "anything whose argmax is the greedy
            # token" for greedy rows): skip building the one-hot probabilities.
            return accept(tree, logits, draft_probs, greedy=True)
        greedy_rows = torch.tensor(greedy, device=self.device)
        return accept(tree, self._probs(sampling, logits), draft_probs, greedy=greedy_rows, generator=streams)

    def release(self, slot: int) -> None:
        self.cache.free(slot)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Swap policy weights between steps; rows in flight continue under the new version."""
        copy_in(self.model, state_dict)
        self.version = version

    def _probs(self, sampling: list[Sampling], logits: torch.Tensor) -> torch.Tensor:
        temperature, top_k, top_p = _columns(sampling, logits.device)
        return target_probs(logits, temperature, top_k, top_p)

    def _logprobs(self, sampling: list[Sampling], logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return behaviour_logprobs(logits, tokens, _columns(sampling, logits.device)[0])


def _concat_features(captured: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """[B, T, layers * hidden], or None when nothing was captured."""
    return torch.cat(captured, dim=-1) if captured else None


def _kept_features(captured: tuple[torch.Tensor, ...], sources: torch.Tensor) -> torch.Tensor | None:
    """The features at the kept verification positions (sources [B, D + 1], -1 = none): a
    drafter continues from the accepted path, never from a rejected node."""
    features = _concat_features(captured)
    if features is None:
        return None
    index = sources.clamp(min=0)[..., None].expand(-1, -1, features.shape[-1])
    return features.gather(1, index) * (sources >= 0)[..., None].to(features.dtype)


def _columns(sampling: list[Sampling], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temperature = torch.tensor([s.temperature for s in sampling], device=device, dtype=torch.float32)
    top_k = torch.tensor([s.top_k for s in sampling], device=device, dtype=torch.long)
    top_p = torch.tensor([s.top_p for s in sampling], device=device, dtype=torch.float32)
    return temperature, top_k, top_p
