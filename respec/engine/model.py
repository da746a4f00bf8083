"""A compact decoder of the Qwen2 / Llama family: RMSNorm, RoPE, GQA, SwiGLU.

Parameter names match Hugging Face's, so safetensors checkpoints load as they are. The
same weights run three ways: `forward` for training (causal, no cache), and
`forward_cached` for prefill, decode and verification of a draft chain or tree against a
static KV cache in which every row has its own length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from respec.engine.config import ModelConfig
from respec.engine.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with the checkpoint's scaling ("linear" or "llama3")."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's long-context rule: slow down low frequencies, keep high ones, blend between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; positions: [B, T]. The rotate-half convention of HF checkpoints."""
    angles = positions[:, None, :, None].float() * inv_freq  # [B, 1, T, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads = layer, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def _project(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def forward(self, x, positions, inv_freq, mask=None, cache: CachedStep | None = None):
        q, k, v = self._project(x, positions, inv_freq)
        if cache is not None:
            k, v = cache.store_and_read(self.layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, inv_freq, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in HF names: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class Output:
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, hidden] after the final norm
    captured: list[torch.Tensor]  # hidden states after the `capture_layers`, in order


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def forward(self, tokens: torch.Tensor, capture_layers: tuple[int, ...] = ()) -> Output:
        """Training / scoring pass: causal over `tokens` [B, T], no cache."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return self._run(tokens, positions, None, None, capture_layers)

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                       tree_mask: torch.Tensor | None = None, capture_layers: tuple[int, ...] = ()) -> Output:
        """Run `tokens` [B, T] after each row's cached prefix; their K/V are written to the cache
        (tentatively: `cache.commit` decides what stays). `tree_mask` [B, T, T] (True: may attend)
        verifies a tree; node i sits at position length + depth(i). Without it, T is causal."""
        step = CachedStep(cache, slots, tokens.shape[1], tree_mask)
        return self._run(tokens, step.positions, step.mask, step, capture_layers)

    def _run(self, tokens, positions, mask, cache, capture_layers) -> Output:
        x = self.model.embed_tokens(tokens)
        captured = []
        for index, layer in enumerate(self.model.layers):
            x = layer(x, positions, self.inv_freq, mask, cache)
            if index in capture_layers:
                captured.append(x)
        hidden = self.model.norm(x)
        return Output(self.lm_head(hidden), hidden, captured)


class CachedStep:
    """Positions, attention mask and cache I/O of one cached forward pass."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, length: int, tree_mask: torch.Tensor | None) -> None:
        cache.check_room(slots, length)
        device = cache.k.device
        self.cache, self.slots = cache, slots
        starts = cache.lengths[slots]  # [B]
        offsets = torch.arange(length, device=device)
        if tree_mask is None:
            tree_mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            tree_mask = tree_mask.expand(slots.numel(), -1, -1)
        depths = tree_mask.sum(-1) - 1  # a node sees itself and its ancestors
        self.positions = starts[:, None] + depths
        self.store_at = starts[:, None] + offsets  # [B, T] storage index of each new entry
        self.keys = int(self.store_at.max()) + 1
        self.mask = self._mask(starts, tree_mask, length)

    def _mask(self, starts, tree_mask, length) -> torch.Tensor:
        keys = torch.arange(self.keys, device=starts.device)
        committed = keys[None, :] < starts[:, None]  # [B, K]
        relative = keys[None, None, :] - starts[:, None, None]  # [B, 1, K]
        in_block = (relative >= 0) & (relative < length)
        block = torch.gather(tree_mask, 2, relative.clamp(0, length - 1).expand(-1, length, -1))
        return (committed[:, None, :] | (in_block & block))[:, None]  # [B, 1, T, K]

    def store_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        rows = self.slots[:, None]
        self.cache.k[layer][rows, :, self.store_at] = k.transpose(1, 2).to(self.cache.k.dtype)
        self.cache.v[layer][rows, :, self.store_at] = v.transpose(1, 2).to(self.cache.v.dtype)
        return self.cache.k[layer][self.slots, :, : self.keys], self.cache.v[layer][self.slots, :, : self.keys]
