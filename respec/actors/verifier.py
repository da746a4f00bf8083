"""Verifier: owns the policy (target) weights and the KV cache; answers VerifyRequests.

Each request may free the slots of finished rows, prefill new rows (their first token
comes back as a row with zero drafts), and verify one draft tree per active row in a
single forward pass with the lossless acceptance rule. New PolicyWeights are swapped in
between requests (handlers run one at a time), and every result carries the policy
version that produced its tokens. A new row whose Prompt.min_policy_version is newer than
the loaded policy (it overtook its weights: they come on another socket) is not admitted
but handed back in `VerifyResult.held`; the Generator sends it again, so the staleness
bound holds whatever the timing.

Bad input is refused per row, never per request: a new row whose prompt is empty, holds
ids outside the vocabulary, does not fit the cache or asks for invalid sampling
parameters comes back in `VerifyResult.rejected` with the reason, and every other row of
the request is served. A checkpoint or tokenizer that cannot be used fails `on_start`
with a message naming the file (the supervisor then reports it as the run's reason).

Every row samples from its own random stream, keyed by (Params.seed, Prompt.prompt_id)
(`respec.engine.sampling.RowStreams`): its tokens depend on its prompt, its key and the
policy, never on the rows it shares a batch with, on message timing or on this process's
history. A sample posed again after a crash (same prompt id) is generated again exactly.

When the request names `capture_layers` (a drafter that reads target features), the
result carries those layers' hidden states: a new row's last `feature_window` prompt
positions, a verified row's kept positions (see VerifyResult.features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch

from respec.engine.admission import check_prompt_tokens
from respec.engine.checkpoint import load_model
from respec.engine.config import ModelConfig
from respec.engine.errors import INPUT_ERRORS, CacheFullError, TokenizerMismatchError
from respec.engine.sampling import stream_key
from respec.engine.target import TargetRunner, Verified
from respec.engine.tokenizer import check_tokenizer_matches, load_tokenizer
from respec.engine.tree import DraftTree
from respec.messages import (
    Envelope,
    PolicyWeights,
    Prompt,
    SamplingParams,
    VerifyRequest,
    VerifyResult,
)
from respec.messages.generation import RejectedRow
from respec.runtime import Actor, handles, weights_transfer


class Verifier(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str  # local Hugging Face checkpoint directory
        max_rows: int = 64
        max_len: int = 512
        seed: int = 0
        device: str = "cpu"
        reserve: int = 16  # cache positions kept free per row for draft nodes
        # tokenizer checked against the model at start; "" = model_path's tokenizer.json if any
        tokenizer_path: str = ""

    async def on_start(self) -> None:
        model = load_model(Path(self.params.model_path), device=self.params.device)
        self._check_tokenizer(model.config)
        self.runner = TargetRunner(model, self.params.max_rows, self.params.max_len, self.params.seed)
        self.sampling: dict[int, SamplingParams] = {}  # slot -> how its row samples

    def _check_tokenizer(self, config: ModelConfig) -> None:
        """A tokenizer whose ids the model cannot embed fails the start, naming both files."""
        directory = Path(self.params.tokenizer_path or self.params.model_path)
        if not self.params.tokenizer_path and not (directory / "tokenizer.json").is_file():
            return  # no tokenizer named and none shipped with the model: prompts arrive as ids
        tokenizer = load_tokenizer(directory)
        try:
            check_tokenizer_matches(tokenizer, config)
        except TokenizerMismatchError as error:
            raise TokenizerMismatchError(
                f"{directory / 'tokenizer.json'} does not fit {Path(self.params.model_path) / 'config.json'}: {error}"
            ) from None

    @handles(PolicyWeights, optional=True)
    async def on_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        if weights.handle.kind in ("cuda_ipc", "collective"):
            try:
                with weights_transfer.opened(weights.handle, weights.version, device=self.params.device) as tensors:
                    self.runner.load_weights(tensors, weights.version)  # load_state_dict: copy_ in place
            except weights_transfer.SupersededWeights as error:  # a newer announcement follows
                self.log.info("policy_weights_superseded", version=weights.version, reason=str(error))
                return
        else:
            self.runner.load_weights(_tensors(weights), weights.version)
        self.log.info("policy_weights_loaded", version=weights.version)

    @handles(VerifyRequest)
    async def on_verify(self, request: VerifyRequest, envelope: Envelope) -> VerifyResult:
        started = time.perf_counter()
        for slot in ([] if request.finished_slots is None else request.finished_slots.tolist()):
            self.runner.release(slot)
            self.sampling.pop(slot, None)
        self.runner.capture_layers = tuple(request.capture_layers)  # the drafter's, per request
        ready, held = self._hold_early(request.new_rows)
        admitted, rejected = self._admit([request.new_rows[i] for i in ready])
        rejected = [msgspec.structs.replace(r, index=ready[r.index]) for r in rejected]
        parts = [self._prefill(admitted, request.feature_window)] if admitted else []
        if len(request.slots):
            parts.append(self._verify(request))
        return _result(request.step, parts, self.runner.version, rejected, held, time.perf_counter() - started)

    # ------------------------------------------------------------------ admission

    def _hold_early(self, prompts: list[Prompt]) -> tuple[list[int], list[int]]:
        """Indices of the new rows the loaded policy may generate, and of those it may not:
        a prompt can overtake the PolicyWeights it needs (another socket), and the handler
        that loads them runs only after this one, so such a row goes back to the Generator
        (held, never dropped) instead of being generated by a policy older than its bound."""
        ready, held = [], []
        for index, prompt in enumerate(prompts):
            (held if prompt.min_policy_version > self.runner.version else ready).append(index)
        return ready, held

    def _admit(self, prompts: list[Prompt]) -> tuple[list[Prompt], list[RejectedRow]]:
        """The prompts that can run, and a RejectedRow (with the reason) for each that cannot."""
        admitted, rejected = [], []
        for index, prompt in enumerate(prompts):
            try:
                self._check_row(prompt, self.runner.free_slots - len(admitted))
            except INPUT_ERRORS as error:
                text = f"{type(error).__name__}: {error}"
                rejected.append(RejectedRow(index=index, prompt_id=prompt.prompt_id, error=text))
                self.log.warning("row_rejected", prompt_id=prompt.prompt_id, error=text)
            else:
                admitted.append(prompt)
        return admitted, rejected

    def _check_row(self, prompt: Prompt, free_slots: int) -> None:
        check_prompt_tokens(prompt.tokens, prompt.sampling.max_new_tokens, self.runner.model.config.vocab_size)
        self.runner.check_admission(len(prompt.tokens), prompt.sampling, self.params.reserve)
        if free_slots <= 0:
            raise CacheFullError(f"no free cache slot (all {self.params.max_rows} in use): the Generator's "
                                 "max_rows must not exceed the Verifier's")

    # ------------------------------------------------------------------ passes

    def _prefill(self, prompts: list[Prompt], window: int) -> _Part:
        parts = []
        order: list[int] = []
        for length in sorted({len(p.tokens) for p in prompts}):  # equal lengths share a pass
            indices = [i for i, p in enumerate(prompts) if len(p.tokens) == length]
            group = [prompts[i] for i in indices]
            slots, verified = self.runner.prefill(
                [torch.from_numpy(np.asarray(p.tokens, np.int64)) for p in group], [p.sampling for p in group],
                streams=[stream_key(self.params.seed, p.prompt_id) for p in group])
            self.sampling.update(zip(slots, (p.sampling for p in group), strict=True))
            order += indices
            parts.append(_Part.of_prefill(slots, verified, window))
        return _Part.cat(parts).reordered(torch.tensor(order).argsort())

    def _verify(self, request: VerifyRequest) -> _Part:
        slots = request.slots.tolist()
        tokens = torch.from_numpy(np.asarray(request.tokens, np.int64))
        tree = DraftTree.from_parents(tokens[:, 1:], torch.from_numpy(np.asarray(request.parents, np.int64)),
                                      torch.from_numpy(np.asarray(request.num_nodes, np.int64)))
        draft_probs = None if request.draft_probs is None else torch.from_numpy(np.asarray(request.draft_probs))
        verified = self.runner.verify(slots, tokens[:, 0], tree, draft_probs, [self.sampling[s] for s in slots])
        return _Part(slots, verified, verified.num_tokens)


@dataclass(frozen=True)
class _Part:
    """Rows of one kind (new or verified) on their way into a VerifyResult."""

    slots: list[int]
    verified: Verified  # its features, when captured, are valid for the first feature_counts[b]
    feature_counts: torch.Tensor  # long [B]

    @classmethod
    def of_prefill(cls, slots: list[int], verified: Verified, window: int) -> _Part:
        """Prefill features cover every prompt token; only the last `window` travel (the
        drafter keeps no more), so a long prompt does not send [T, F] per row."""
        features = verified.features
        if features is None:
            return cls(slots, verified, verified.num_tokens * 0)
        keep = features.shape[1] if window <= 0 else min(window, features.shape[1])
        counts = torch.full((len(slots),), keep, dtype=torch.long, device=features.device)
        return cls(slots, _with_features(verified, features[:, features.shape[1] - keep:]), counts)

    @classmethod
    def cat(cls, parts: list[_Part]) -> _Part:
        def joined(name: str, fill: float) -> torch.Tensor | None:
            values = [getattr(p.verified, name) for p in parts]
            return None if values[0] is None else _cat_padded(values, fill)

        verified = Verified(*(joined(name, fill) for name, fill in _FIELDS))
        return cls([s for p in parts for s in p.slots], verified, torch.cat([p.feature_counts for p in parts]))

    def reordered(self, order: torch.Tensor) -> _Part:
        v = self.verified
        fields = [None if getattr(v, name) is None else getattr(v, name)[order] for name, _ in _FIELDS]
        return _Part([self.slots[i] for i in order.tolist()], Verified(*fields), self.feature_counts[order])


_FIELDS = (("tokens", -1), ("logprobs", 0.0), ("num_tokens", 0), ("num_accepted", 0), ("features", 0.0))


def _with_features(verified: Verified, features: torch.Tensor | None) -> Verified:
    return Verified(verified.tokens, verified.logprobs, verified.num_tokens, verified.num_accepted, features)


def _cat_padded(values: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Concatenate over rows, padding dimension 1 (positions) to the widest."""
    if values[0].dim() == 1:
        return torch.cat(values)
    width = max(v.shape[1] for v in values)
    padded = []
    for v in values:
        pad = [0, 0] * (v.dim() - 2) + [0, width - v.shape[1]]
        padded.append(torch.nn.functional.pad(v, pad, value=fill))
    return torch.cat(padded)


def _result(step: int, parts: list[_Part], version: int, rejected: list[RejectedRow], held: list[int],
            seconds: float) -> VerifyResult:
    if not parts:  # every new row was rejected or held and nothing else was asked
        empty = np.zeros((0, 1), np.int32)
        return VerifyResult(step=step, slots=np.zeros(0, np.int32), num_accepted=np.zeros(0, np.int32),
                            tokens=empty, logprobs=empty.astype(np.float32), policy_version=version,
                            rejected=rejected, held=held, step_time_s=seconds)
    merged = _Part.cat(parts)
    v = merged.verified
    features = None if v.features is None else v.features.detach().cpu().contiguous()
    return VerifyResult(
        step=step, slots=np.array(merged.slots, dtype=np.int32), num_accepted=v.num_accepted.cpu().numpy().astype(np.int32),
        tokens=v.tokens.cpu().numpy().astype(np.int32), logprobs=v.logprobs.cpu().numpy().astype(np.float32),
        features=features, feature_counts=None if features is None else merged.feature_counts.cpu().numpy().astype(np.int32),
        step_time_s=seconds, policy_version=version, rejected=rejected, held=held,
    )


def _tensors(weights: PolicyWeights) -> dict[str, torch.Tensor]:
    handle = weights.handle
    if handle.kind == "local" and handle.tensors is not None:
        return {name: torch.as_tensor(np.asarray(t)) if isinstance(t, np.ndarray) else t
                for name, t in handle.tensors.items()}
    if handle.kind == "file":
        from safetensors.torch import load_file

        return load_file(handle.location)
    raise ValueError(f"policy weights of kind {handle.kind!r} are not supported (local, file, cuda_ipc, collective)")
