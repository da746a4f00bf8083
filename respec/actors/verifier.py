"""Verifier: owns the policy (target) weights and the KV cache; answers VerifyRequests.

Each request may free the slots of finished rows, prefill new rows (their first token
comes back as a row with zero drafts), and verify one draft tree per active row in a
single forward pass with the lossless acceptance rule. New PolicyWeights are swapped in
between requests (handlers run one at a time), and every result carries the policy
version that produced its tokens.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import torch

from respec.engine.checkpoint import load_model
from respec.engine.target import TargetRunner, Verified
from respec.engine.tree import DraftTree
from respec.messages import (
    Envelope,
    PolicyWeights,
    Prompt,
    SamplingParams,
    VerifyRequest,
    VerifyResult,
)
from respec.runtime import Actor, handles


class Verifier(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str  # local Hugging Face checkpoint directory
        max_rows: int = 64
        max_len: int = 512
        seed: int = 0
        device: str = "cpu"
        reserve: int = 16  # cache positions kept free per row for draft nodes

    async def on_start(self) -> None:
        model = load_model(Path(self.params.model_path), device=self.params.device)
        self.runner = TargetRunner(model, self.params.max_rows, self.params.max_len, self.params.seed)
        self.sampling: dict[int, SamplingParams] = {}  # slot -> how its row samples

    @handles(PolicyWeights, optional=True)
    async def on_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        self.runner.load_weights(_tensors(weights), weights.version)
        self.log.info("policy_weights_loaded", version=weights.version)

    @handles(VerifyRequest)
    async def on_verify(self, request: VerifyRequest, envelope: Envelope) -> VerifyResult:
        for slot in ([] if request.finished_slots is None else request.finished_slots.tolist()):
            self.runner.release(slot)
            self.sampling.pop(slot, None)
        parts = [self._prefill(request.new_rows)] if request.new_rows else []
        if len(request.slots):
            parts.append(self._verify(request))
        return _result(request.step, parts, self.runner.version)

    def _prefill(self, prompts: list[Prompt]) -> tuple[list[int], Verified]:
        for prompt in prompts:
            self.runner.check_admission(len(prompt.tokens), prompt.sampling, self.params.reserve)
        order, slots, outputs = [], [], []
        for length in sorted({len(p.tokens) for p in prompts}):  # equal lengths share a pass
            indices = [i for i, p in enumerate(prompts) if len(p.tokens) == length]
            group = [prompts[i] for i in indices]
            group_slots, verified = self.runner.prefill(
                [torch.from_numpy(np.asarray(p.tokens, np.int64)) for p in group], [p.sampling for p in group])
            self.sampling.update(zip(group_slots, (p.sampling for p in group), strict=True))
            order += indices
            slots += group_slots
            outputs.append(verified)
        return _in_request_order(order, slots, outputs)

    def _verify(self, request: VerifyRequest) -> tuple[list[int], Verified]:
        slots = request.slots.tolist()
        tokens = torch.from_numpy(np.asarray(request.tokens, np.int64))
        tree = DraftTree.from_parents(tokens[:, 1:], torch.from_numpy(np.asarray(request.parents, np.int64)),
                                      torch.from_numpy(np.asarray(request.num_nodes, np.int64)))
        draft_probs = None if request.draft_probs is None else torch.from_numpy(np.asarray(request.draft_probs))
        verified = self.runner.verify(slots, tokens[:, 0], tree, draft_probs, [self.sampling[s] for s in slots])
        return slots, verified


def _in_request_order(order: list[int], slots: list[int], outputs: list[Verified]) -> tuple[list[int], Verified]:
    """Prefill groups came out by length; put them back in the request's order."""
    back = torch.tensor(order).argsort()
    merged = Verified(*(torch.cat([getattr(o, name) for o in outputs])[back] for name in
                        ("tokens", "logprobs", "num_tokens", "num_accepted")))
    return [slots[i] for i in back.tolist()], merged


def _result(step: int, parts: list[tuple[list[int], Verified]], version: int) -> VerifyResult:
    width = max(part[1].tokens.shape[1] for part in parts)

    def padded(name: str, fill: float) -> np.ndarray:
        return torch.cat([torch.nn.functional.pad(getattr(v, name), (0, width - getattr(v, name).shape[1]), value=fill)
                          for _, v in parts]).numpy()

    slots = np.array([slot for part in parts for slot in part[0]], dtype=np.int32)
    num_accepted = torch.cat([v.num_accepted for _, v in parts]).numpy().astype(np.int32)
    return VerifyResult(step=step, slots=slots, num_accepted=num_accepted, policy_version=version,
                        tokens=padded("tokens", -1).astype(np.int32), logprobs=padded("logprobs", 0.0).astype(np.float32))


def _tensors(weights: PolicyWeights) -> dict[str, torch.Tensor]:
    handle = weights.handle
    if handle.kind == "local" and handle.tensors is not None:
        return {name: torch.as_tensor(np.asarray(t)) if isinstance(t, np.ndarray) else t
                for name, t in handle.tensors.items()}
    if handle.kind == "file":
        from safetensors.torch import load_file

        return load_file(handle.location)
    raise ValueError(f"policy weights of kind {handle.kind!r} are not supported by the Verifier yet")
