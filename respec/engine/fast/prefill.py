"""The fast path's prefill: prompts already in the state's prompt buffer go through the
policy in one right-padded pass written straight into rows 0..b-1 of the KV store, each
row's first token is sampled, and the head runs over the prompt so drafting can start.
Device work only, so it can be captured per (bucket, padded width) like a step."""

from __future__ import annotations

import torch

from respec.engine.fast.chain_step import StepConfig, _logprobs, _sample
from respec.engine.fast.fused import FusedHead, FusedModel
from respec.engine.fast.state import FastState, StaticKV


def prefill_rows(model: FusedModel, head: FusedHead | None, state: FastState, b: int, width: int, max_new: int,
                 step: StepConfig) -> None:
    tokens, lengths = state.prompt[:b, :width], state.prompt_length[:b]
    positions = torch.arange(width, device=tokens.device).expand(b, width)
    capture = head.head.capture_layers if head is not None else ()
    # Causal: right padding sits after every real token, so no real token sees it.
    logits, features = model.run(tokens, positions, StaticKV(state.k, state.v, positions), capture)
    last = logits.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, logits.shape[-1])).float()
    first = last[:, 0].argmax(-1) if step.temperature == 0 else _sample(torch.softmax(last[:, 0] / step.temperature, -1))
    _start_rows(state, b, first, _logprobs(last, first[:, None], step.temperature)[:, 0], max_new, step.eos_ids)
    if head is not None:
        # Head position i reads (feature of prompt token i, token i + 1): the last prompt
        # position reads the first sampled token, and its h is the root's.
        following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).scatter(1, (lengths - 1)[:, None], first[:, None])
        inputs = head.head.fuse(features.to(state.root_h.dtype))
        hidden = head(inputs, following, positions, StaticKV(state.head_k, state.head_v, positions))
        state.root_h[:b] = hidden.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]


def _start_rows(state: FastState, b: int, first, logp, max_new: int, eos_ids: tuple[int, ...]) -> None:
    state.lengths[:b] = state.prompt_length[:b]
    state.head_lengths[:b] = state.prompt_length[:b]
    state.root[:b] = first
    state.out[:b] = 0
    state.out[:b, 0], state.out_logp[:b, 0] = first, logp
    state.out_count[:b], state.max_new[:b] = 1, max_new
    state.accepted[:b], state.steps[:b] = 0, 0
    stopped = ~state.prompt_live[:b] | (max_new <= 1)
    for eos in eos_ids:
        stopped = stopped | (first == eos)
    state.done[:b] = stopped
