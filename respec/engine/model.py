"""A compact Qwen2 / Llama decoder: RMSNorm, RoPE (with the checkpoint's theta and
scaling), grouped-query attention, SwiGLU MLP, tied or untied embeddings.

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...), so
safetensors checkpoints load as they are. One set of weights runs three ways:

- ``model(tokens, attention_mask).logits``: the training pass (causal, autograd, no
  cache; right padding allowed), which the RL trainer uses to recompute log-probs;
- ``model.forward_cached(tokens, cache, slots, tree_mask)``: prefill, decode and draft
  verification against a static KV cache in which every row sits at its own length.

Both return a ``ForwardOutput``: logits, the final-normed hidden state, and on request
the hidden states after chosen layers (an EAGLE-3 drafter fuses a low, a middle and a
high layer).

Attention goes through ``scaled_dot_product_attention`` with an explicit boolean mask
(True = may attend). Grouped-query attention folds the query heads that share a K/V head
into the query length instead of repeating K and V, so the cache is never copied per head.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from respec.engine.config import ModelConfig, RopeScaling
from respec.engine.cpu_linear import Linear
from respec.engine.kv_cache import KVCache


@dataclass(frozen=True)
class ForwardOutput:
    logits: Tensor  # [B, T, V] (or [B, 1, V] with only_last)
    captured: tuple[Tensor, ...]  # [B, T, hidden] after each of capture_layers, in that order
    last_hidden: Tensor  # [B, T, hidden] after the final norm: what lm_head reads


# ---------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (bf16 squares lose too much), scale in the input's dtype.
        # F.rms_norm is x * rsqrt(mean(x^2) + eps), the same float32 arithmetic in fewer ops.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """float32 [head_dim / 2]: RoPE's angular speed per channel pair, scaled as configured."""
    # Explicit CPU: the model may be built under torch.device("meta") to load a checkpoint.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_frequencies(inv_freq, scaling)


def _llama3_frequencies(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1: wavelengths longer than the original context / low_freq_factor are slowed
    by `factor`, shorter than context / high_freq_factor kept, and blended in between."""
    context = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_between, blended, slowed)


class Rotary:
    """cos/sin tables for given positions. Not an nn.Module buffer on purpose: ``.to(bf16)``
    would round the frequencies, so a float32 table is kept per device instead."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.initial_size = config.max_position_embeddings
        self._tables: dict[torch.device, Tensor] = {}  # float32 [positions, 2 * head_dim]: cos | sin

    def cos_sin(self, positions: Tensor, dtype: torch.dtype, end: int | None = None) -> tuple[Tensor, Tensor]:
        """positions long [B, T] -> cos, sin [B, 1, T, head_dim] in `dtype`. `end`: a bound
        the caller knows (every position < end), which saves reading positions.max().

        A pass looks its rows up in a table (one op) instead of computing angles, cos and
        sin again (eight): at batch 1 on a CPU a pass costs about what its op count does.
        The table holds the very values the formula gives (the same float32 products)."""
        if end is None:
            end = int(positions.max()) + 1 if positions.numel() else 0
        rows = self._table(positions.device, end)[positions][:, None]
        half = rows.shape[-1] // 2
        return rows[..., :half].to(dtype), rows[..., half:].to(dtype)

    def _table(self, device: torch.device, end: int) -> Tensor:
        table = self._tables.get(device)
        if table is None or table.shape[0] < end:
            size = max(end, self.initial_size, 2 * (0 if table is None else table.shape[0]))
            inv_freq = self.inv_freq.to(device)
            angles = torch.arange(size, device=device).float()[:, None] * inv_freq
            angles = torch.cat([angles, angles], dim=-1)  # HF pairs channel i with i + D/2
            table = self._tables[device] = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return table


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class AttentionMask:
    """One pass's attention mask, prepared once for all its layers instead of once per
    layer: additive (0 = may attend, -inf = may not: what SDPA makes of a boolean mask on
    every call, so the arithmetic is the same) and repeated for the query heads of a group
    (``grouped_attention``'s layout), [B, 1, group * T, S]."""

    def __init__(self, visible: Tensor, group: int, dtype: torch.dtype) -> None:
        additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        self.additive = additive.repeat(1, 1, group, 1) if group > 1 else additive


# SDPA's backends without cuDNN's: on H100/H200 under torch 2.11 its backward returns NaN
# grad_q for an explicit mask at sequence lengths of 64 mod 128 (pytorch/pytorch#196678).
# The GRPO update most likely met it: non-finite gradients in 0-3 of 15 steps per variant of
# the 2-GPU bench at 37d2bab (lengths padded to multiples of 32, so 192 and 320 occur).
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | AttentionMask | None) -> Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, S, D]; mask bool [B, 1, T, S], prepared, or None (every
    query sees every key) -> [B, H, T, D].

    The H / Hkv query heads of a group share one K/V head (query head h uses K/V head
    h // group, as in HF), so they are stacked along the query axis instead of copying K/V.
    """
    b, h, t, d = q.shape
    group = h // k.shape[1]
    if isinstance(mask, AttentionMask):
        mask = mask.additive
    elif group > 1 and mask is not None:  # None: every query sees every key
        mask = mask.repeat(1, 1, group, 1)
    if group > 1:
        q = q.reshape(b, k.shape[1], group * t, d)
    with sdpa_kernel(_ATTENTION_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    return out.reshape(b, h, t, d)


class _KVWrites:
    """The cache I/O of one cached pass: where new entries go and how much to read back.
    What every layer would otherwise work out again (which store rows, and for a single
    row the span its entries occupy) is worked out once per pass."""

    def __init__(self, cache: KVCache, slots: Tensor, positions: Tensor, read_length: int):
        self.cache, self.slots, self.positions, self.read_length = cache, slots, positions, read_length
        self.rows = cache.rows_of(slots)
        self.span = cache.span_of(slots, positions)

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.span is not None:
            self.cache.write_span(layer, *self.span, k, v)
        else:
            self.cache.write(layer, self.slots, self.positions, k, v)
        return self.cache.read_rows(layer, self.rows, self.read_length)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden, q_size, bias=config.attention_bias)
        self.k_proj = Linear(hidden, kv_size, bias=config.attention_bias)
        self.v_proj = Linear(hidden, kv_size, bias=config.attention_bias)
        self.o_proj = Linear(q_size, hidden, bias=config.output_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | AttentionMask,
                kv: _KVWrites | None) -> Tensor:
        b, t, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k rotate as one tensor: one RoPE's handful of small ops instead of two.
        qk = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1).view(b, t, heads + kv_heads, dim).transpose(1, 2)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = self.v_proj(x).view(b, t, kv_heads, dim).transpose(1, 2)
        if kv is not None:
            k, v = kv.store_and_read(self.layer_index, k, v)
        out = grouped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(hidden, inner, bias=bias)
        self.up_proj = Linear(hidden, inner, bias=bias)
        self.down_proj = Linear(inner, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | AttentionMask,
                kv: _KVWrites | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """What HF calls ``model``: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------- the model


class CausalLM(nn.Module):
    """Decoder + lm_head, with HF parameter names (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings, lm_head and the embeddings share one tensor."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ pieces a drafter reuses

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def output_head(self) -> nn.Linear:
        return self.lm_head

    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.embed_tokens(tokens)

    def compute_logits(self, last_hidden: Tensor) -> Tensor:
        """Logits from final-normed hidden states (``ForwardOutput.last_hidden``)."""
        return self.lm_head(last_hidden)

    # ------------------------------------------------------------------ training pass

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        capture_layers: tuple[int, ...] | None = None,
    ) -> ForwardOutput:
        """A causal pass over tokens [B, T]; ``.logits`` is [B, T, V]. attention_mask [B, T]
        (1 = real token) hides padding, and positions count real tokens only.
        capture_layers: also return the hidden states after these layers."""
        b, t = tokens.shape
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        if attention_mask is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
            mask = causal.expand(b, 1, t, t)
        else:
            real = attention_mask.bool()
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            diagonal = torch.eye(t, dtype=torch.bool, device=tokens.device)
            mask = ((causal & real[:, None, :]) | diagonal)[:, None]  # padding still sees itself: no NaN
        return self._run(tokens, positions, mask, None, capture_layers, None, t)

    # ------------------------------------------------------------------ cached pass

    def forward_cached(
        self,
        tokens: Tensor,
        cache: KVCache,
        slots: Tensor,
        tree_mask: Tensor | None = None,
        capture_layers: tuple[int, ...] | None = None,
        num_tokens: Tensor | None = None,
        only_last: bool = False,
    ) -> ForwardOutput:
        """Run tokens [B, T] right after each row's cached prefix (row b in cache slot
        ``slots[b]``, at its own length). New K/V entries are written tentatively; the
        caller keeps what it wants with ``cache.commit`` / ``cache.advance``.

        tree_mask: bool [B, T, T], True where token i may attend token j of this pass; a
        token sits at position length + depth, depth = row sum - 1 (it sees itself and its
        ancestors). Without it the T tokens are causal (prefill, decode, chain).
        num_tokens: long [B], real tokens per row when rows are right-padded (prefill of
        unequal prompts); only_last then returns each row's logits at its last real token.
        """
        b, t = tokens.shape
        slots = torch.as_tensor(slots, dtype=torch.long, device=cache.device)
        lengths = cache.lengths[slots]
        longest = int((lengths + t).max())  # one host read serves the room check and the read length
        if num_tokens is not None or longest > cache.max_len:
            cache.check_room(slots, t if num_tokens is None else num_tokens)  # before any write
        read_length = min(longest, cache.max_len)
        if tree_mask is None:
            positions = lengths[:, None] + torch.arange(t, device=cache.device)
            # Causal: key j is visible to a new token iff j <= its position (the committed
            # prefix, then the new tokens up to itself), which is _cached_mask's answer for
            # a lower-triangular tree in three ops instead of fifteen.
            mask = (torch.arange(read_length, device=cache.device) <= positions[..., None])[:, None]
        else:
            local = _local_mask(tree_mask, b, t, cache.device)
            positions = lengths[:, None] + local.sum(-1) - 1
            mask = _cached_mask(lengths, local, read_length)
        writes = _KVWrites(cache, slots, cache.write_positions(slots, t, lengths), read_length)
        last = None
        if only_last:
            last = torch.full((b,), t - 1, device=cache.device) if num_tokens is None else (
                torch.as_tensor(num_tokens, dtype=torch.long, device=cache.device) - 1)
        return self._run(tokens, positions, mask, writes, capture_layers, last, longest)

    # ------------------------------------------------------------------ shared body

    def _run(
        self,
        tokens: Tensor,
        positions: Tensor,
        mask: Tensor,
        kv: _KVWrites | None,
        capture_layers: tuple[int, ...] | None,
        last_index: Tensor | None,
        end: int,
    ) -> ForwardOutput:
        """The layers over tokens at `positions` (all < `end`) seeing what `mask` allows."""
        capture = self._check_capture(capture_layers)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary.cos_sin(positions, x.dtype, end)
        config = self.config
        prepared = AttentionMask(mask, config.num_attention_heads // config.num_key_value_heads, x.dtype)
        captured: dict[int, Tensor] = {}
        for index, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, prepared, kv)
            if index in capture:
                captured[index] = x
        last_hidden = self.model.norm(x)
        if last_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            last_hidden = last_hidden[rows, last_index][:, None]
        return ForwardOutput(self.lm_head(last_hidden), tuple(captured[i] for i in capture), last_hidden)

    def _check_capture(self, capture_layers: tuple[int, ...] | None) -> tuple[int, ...]:
        capture = tuple(capture_layers or ())
        count = self.config.num_hidden_layers
        if any(not 0 <= i < count for i in capture):
            raise ValueError(f"capture_layers {capture} must be layer indices in [0, {count})")
        return capture


def _local_mask(tree_mask: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    """bool [B, T, T]: who sees whom among the new tokens; causal when no tree is given."""
    if tree_mask is None:
        return torch.ones(t, t, dtype=torch.bool, device=device).tril().expand(b, t, t)
    if tree_mask.shape != (b, t, t):
        raise ValueError(f"tree_mask must be [{b}, {t}, {t}], got {tuple(tree_mask.shape)}")
    diagonal = torch.eye(t, dtype=torch.bool, device=device)
    return tree_mask.to(device=device, dtype=torch.bool) | diagonal


def _cached_mask(lengths: Tensor, local: Tensor, read_length: int) -> Tensor:
    """bool [B, 1, T, S]: key j is visible to new token i when j is in the row's committed
    prefix (j < length) or is new token s = j - length with local[i, s]."""
    b, t, _ = local.shape
    keys = torch.arange(read_length, device=lengths.device)
    relative = keys[None, :] - lengths[:, None]  # [B, S]: index among the new tokens
    committed = relative < 0
    is_new = (relative >= 0) & (relative < t)
    new_visible = local.gather(2, relative.clamp(0, t - 1)[:, None, :].expand(b, t, read_length))
    return (committed[:, None, :] | (is_new[:, None, :] & new_visible))[:, None]
