"""One decoding step of the fast path, with no host synchronisation: EAGLE chain drafting,
the target's verification pass, the acceptance rule, and the bookkeeping, all on device.

``chain_step(..., k=0)`` is plain decoding (one target token per row); k > 0 drafts a
chain of k tokens with the head and verifies them in one pass of k + 1 tokens. Rows that
are done keep flowing through the arithmetic (static shapes) but change nothing.

Acceptance, per row (chains of deterministic drafts, the rule of
``respec.engine.acceptance`` for that case):
- greedy: draft i is kept while it equals the target's argmax; the bonus token is the
  argmax after the last kept draft;
- sampled: draft i is kept with probability p(d_i); at the first rejection the bonus is
  drawn from p with d_i removed (renormalised), after k acceptances from p itself. This
  is exactly p: P(x) = p(d) [x = d] + (1 - p(d)) p(x) / (1 - p(d)) [x != d].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from respec.engine.fast.fused import FusedHead, FusedModel
from respec.engine.fast.state import FastState, StaticKV


@dataclass(frozen=True)
class StepConfig:
    k: int  # drafted tokens per row; 0 = plain decoding
    temperature: float  # 0 = greedy
    eos_ids: tuple[int, ...]


def chain_step(model: FusedModel, head: FusedHead | None, state: FastState, b: int, step: StepConfig) -> None:
    """Advance rows 0..b-1 of `state` by one verification step (see the module docstring)."""
    k = step.k
    drafts = _draft_chain(head, state, b, k) if k else state.root.new_zeros(b, 0)
    tokens = torch.cat([state.root[:b, None], drafts], dim=1)  # [b, k + 1]
    lengths = state.lengths[:b]
    positions = lengths[:, None] + torch.arange(k + 1, device=tokens.device)
    kv = StaticKV(state.k, state.v, positions.clamp(max=state.max_len))
    # With a head, plain steps keep its cache current too, so a later step may draft again.
    capture = head.head.capture_layers if head is not None else ()
    logits, features = model.run(tokens, positions, kv, capture)
    logits = logits.float()
    accepted, bonus = _accept(logits, drafts, step.temperature)
    emitted = torch.cat([drafts, drafts.new_zeros(b, 1)], dim=1).scatter(1, accepted[:, None], bonus[:, None])
    live = ~state.done[:b]
    valid = (torch.arange(k + 1, device=tokens.device) <= accepted[:, None]) & live[:, None]
    _record(state, b, emitted, _logprobs(logits, emitted, step.temperature), valid, step.eos_ids)
    grow = torch.where(live, accepted + 1, 0)
    state.lengths[:b] += grow
    state.root[:b] = torch.where(live, bonus, state.root[:b])
    state.accepted[:b] += torch.where(live, accepted, 0)
    state.steps[:b] += live.long()
    if head is not None:
        _catch_up(head, state, b, features, emitted, accepted, grow)


def _accept(logits: Tensor, drafts: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(accepted drafts [b], bonus token [b]) from target logits [b, k + 1, V]."""
    k = drafts.shape[1]
    if temperature == 0:
        best = logits.argmax(-1)
        keep = drafts == best[:, :k]
        accepted = keep.long().cumprod(1).sum(1)
        return accepted, best.gather(1, accepted[:, None])[:, 0]
    probs = torch.softmax(logits / temperature, dim=-1)
    p_draft = probs[:, :k].gather(2, drafts[..., None])[..., 0]
    keep = torch.rand_like(p_draft) < p_draft
    accepted = keep.long().cumprod(1).sum(1)
    residual = probs.gather(1, accepted[:, None, None].expand(-1, 1, probs.shape[-1]))[:, 0]
    rejected = F.pad(drafts, (0, 1), value=-1).gather(1, accepted[:, None])  # -1 after k acceptances
    removed = torch.zeros_like(residual, dtype=torch.bool).scatter_(1, rejected.clamp(min=0), rejected >= 0)
    return accepted, _sample(residual.masked_fill(removed, 0.0))


def _sample(weights: Tensor) -> Tensor:
    """One token per row from unnormalised weights [b, V]: argmax of w / E with E ~ Exp(1)
    is distributed as w / sum(w) (the exponential race), with no normalisation or sync."""
    return (weights / torch.empty_like(weights).exponential_()).argmax(-1)


def _logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """Behaviour log-probabilities as ``sampling.behaviour_logprobs`` defines them."""
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / scale, dim=-1).gather(2, tokens[..., None])[..., 0]


def _record(state: FastState, b: int, emitted: Tensor, logp: Tensor, valid: Tensor, eos_ids: tuple[int, ...]) -> None:
    """Append the valid emitted tokens to each row's output; mark rows that finished."""
    spare = state.out.shape[1] - 1
    at = state.out_count[:b, None] + torch.arange(emitted.shape[1], device=emitted.device)
    at = torch.where(valid & (at < spare), at, spare)
    state.out[:b].scatter_(1, at, emitted)
    state.out_logp[:b].scatter_(1, at, logp)
    state.out_count[:b] += valid.sum(1)
    stopped = torch.zeros_like(valid)
    for eos in eos_ids:
        stopped |= valid & (emitted == eos)
    state.done[:b] |= stopped.any(1) | (state.out_count[:b] >= state.max_new[:b])


def _draft_chain(head: FusedHead, state: FastState, b: int, k: int) -> Tensor:
    """k tokens per row [b, k]: the head's argmax from the root's h, then k - 1 head passes,
    each writing its keys/values tentatively after the row's committed head positions."""
    hidden = state.root_h[:b, None]
    token = head.head.argmax_tokens(hidden)
    drafted = [token]
    for level in range(k - 1):
        position = state.head_lengths[:b, None] + level
        kv = StaticKV(state.head_k, state.head_v, position.clamp(max=state.max_len))
        hidden = head(hidden, token, position, kv)
        token = head.head.argmax_tokens(hidden)
        drafted.append(token)
    return torch.cat(drafted, dim=1)


def _catch_up(head: FusedHead, state: FastState, b: int, features: Tensor, emitted: Tensor, accepted: Tensor,
              grow: Tensor) -> None:
    """Run the head over the newly committed positions with the target's features (head
    position i reads feature i and token i + 1), overwriting the drafted entries, and keep
    the h of the last one as the next root's."""
    positions = state.head_lengths[:b, None] + torch.arange(emitted.shape[1], device=emitted.device)
    kv = StaticKV(state.head_k, state.head_v, positions.clamp(max=state.max_len))
    inputs = head.head.fuse(features.to(state.root_h.dtype))
    hidden = head(inputs, emitted, positions, kv)
    last = hidden.gather(1, accepted[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
    state.root_h[:b] = torch.where((grow > 0)[:, None], last, state.root_h[:b])
    state.head_lengths[:b] += grow
