"""From logits to the distribution a row samples from: temperature, top-k, top-p per row.

``target_probs`` is the one distribution both plain sampling and the speculative
acceptance rule use, so speculative decoding samples exactly what plain decoding would.
Parameters are per-row tensors [B] (rows of one batch may differ):

- temperature: 0 = greedy, a one-hot distribution at the argmax;
- top_k: keep the k most likely tokens, 0 = off;
- top_p: keep the smallest most-likely set whose mass reaches p, 1.0 = off.

They apply in that order (temperature, then top-k, then top-p), as in transformers.

**Row streams.** Every random number a row's tokens need comes from that row's own
counter-based stream (``RowStreams``): u(key, position, lane), Threefry-2x32-20 (the
Random123 generator JAX uses) of the row's 64-bit key and the counter (position of the
token being decided, lane). A row's draws therefore depend on its key and its own
positions only: not on which rows share its batch, on how many numbers earlier batches
drew, or on the process that serves it. A sample posed again (after a crash) with the
same key and policy gives the same tokens. Lane 0 is the draw that samples the token at
that position (plain decoding, the prefill's first token, SD's bonus); lane j + 1 is
the acceptance draw of the j-th child tried there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def validate(temperature: Tensor | float, top_k: Tensor | int, top_p: Tensor | float) -> None:
    """ValueError naming the first bad parameter and its value (scalars or per-row tensors)."""
    temperature, top_k, top_p = (torch.as_tensor(x) for x in (temperature, top_k, top_p))
    if top_k.is_floating_point() or top_k.dtype == torch.bool:
        raise ValueError(f"top_k must be an integer (0 = off), got {top_k.tolist()}")
    checks = (
        ("temperature", temperature, ~(temperature >= 0), ">= 0 (0 = greedy)"),
        ("top_k", top_k, top_k < 0, "an integer >= 0 (0 = off)"),
        ("top_p", top_p, ~((top_p > 0) & (top_p <= 1)), "in (0, 1] (1 = off)"),
    )
    for name, values, bad, rule in checks:
        if bool(bad.any()):
            value = values.flatten()[bad.flatten().nonzero()[0, 0]].item()
            raise ValueError(f"{name} must be {rule}, got {value}")


def target_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """float32 probabilities, same shape as logits ([B, V] or [B, T, V]); parameters [B]."""
    validate(temperature, top_k, top_p)
    logits = logits.float()
    shape = (-1,) + (1,) * (logits.dim() - 1)  # broadcast [B] over positions and vocab
    greedy = (temperature == 0).reshape(shape)
    scale = torch.where(temperature > 0, temperature, 1.0).float().reshape(shape)
    scaled = _truncate(logits / scale, top_k.reshape(shape), top_p.float().reshape(shape))
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, one_hot, probs)
    return probs


def _truncate(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (one sort serves both)."""
    if not bool((top_k > 0).any() or (top_p < 1).any()):
        return logits  # sorting a large vocabulary is the expensive part: skip when off
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k > 0) & (rank >= top_k)
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # the top token always stays (mass_before = 0)
    drop = (top_p < 1) & (mass_before >= top_p)
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def sample_inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """long [B]: per row the token at which the CDF of unnormalised probs [B, V] passes
    u [B] (uniform in [0, 1)) of its total; never an entry with probability 0."""
    cdf = probs.cumsum(-1)
    token = (cdf <= u.to(cdf.dtype)[:, None] * cdf[:, -1:]).sum(-1)
    # u * total can round up to total; fall back to the last token with mass.
    last_with_mass = probs.shape[1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
    return torch.minimum(token, last_with_mass)


# ------------------------------------------------------------------- row streams

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)  # Threefry-2x32 (Salmon et al. 2011, Random123)
_PARITY = np.uint32(0x1BD11BDA)


def stream_key(seed: int, name: str) -> int:
    """A row's 63-bit stream key from the run's seed and a name unique to the sample (a
    prompt id): stable across processes and Python versions (not ``hash``, which is salted)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def threefry2x32(key: tuple[np.ndarray, np.ndarray], counter: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 with 20 rounds on uint32 arrays (broadcast together; uint32 sums wrap
    modulo 2**32 as the generator wants). NumPy, not torch: ~175 operations on a few hundred
    numbers cost a quarter of the time in NumPy on the CPU, where the reference engine
    synchronises every step anyway."""
    k0, k1 = (np.asarray(k, np.uint32) for k in key)
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = np.broadcast_arrays(np.asarray(counter[0], np.uint32) + k0, np.asarray(counter[1], np.uint32) + k1)
    x0, x1 = x0.copy(), x1.copy()
    for round_ in range(20):
        x0 += x1
        r = np.uint32(_ROTATIONS[round_ % 8])
        x1 = (x1 << r) | (x1 >> (np.uint32(32) - r))
        x1 ^= x0
        if round_ % 4 == 3:  # key injection after every 4 rounds
            s = round_ // 4 + 1
            x0 += schedule[s % 3]
            x1 += schedule[(s + 1) % 3] + np.uint32(s)
    return x0, x1


@dataclass(frozen=True)
class RowStreams:
    """The counter-based streams of a batch of rows (see the module docstring)."""

    keys: Tensor  # long [B]: each row's stream key (``stream_key``), 63 bits
    positions: Tensor  # long [B]: the sequence position of the first token to decide

    def uniforms(self, steps: int, lanes: int) -> Tensor:
        """float32 [B, steps, lanes] in [0, 1) on the keys' device: u(key, position + step,
        lane). 24 random bits each, as ``torch.rand`` gives a float32."""
        keys = self.keys.cpu().numpy().astype(np.uint64)[:, None, None]
        position = self.positions.cpu().numpy()[:, None, None] + np.arange(steps)[None, :, None]
        lane = np.arange(lanes, dtype=np.uint32)[None, None, :]
        key = ((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), (keys >> np.uint64(32)).astype(np.uint32))
        x0, _ = threefry2x32(key, (position.astype(np.uint32), lane))
        u = (x0 >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
        return torch.from_numpy(u).to(self.keys.device)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """long [...]: one token drawn from each distribution of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator)
    return tokens.reshape(probs.shape[:-1])


def behaviour_logprobs(logits: Tensor, tokens: Tensor, temperature: Tensor) -> Tensor:
    """float32 log_softmax(logits / T)[token], T = 1 where the row is greedy (T = 0).

    This is the log-probability the RL trainer recomputes from the same weights for its
    importance ratio: untruncated (no top-k/top-p) and never a one-hot, whose 0 / -inf
    would make every ratio degenerate. logits [B, V] or [B, T, V]; tokens [B] or [B, T].
    """
    shape = (-1,) + (1,) * (logits.dim() - 1)
    scale = torch.where(temperature > 0, temperature, 1.0).float().reshape(shape)
    logp = torch.log_softmax(logits.float() / scale, dim=-1)
    return logp.gather(-1, tokens.long().clamp(min=0)[..., None]).squeeze(-1)
