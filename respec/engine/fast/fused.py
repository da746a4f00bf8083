"""The policy and the draft head's layer with few kernels per layer, for the fast path.

On a GPU at small batch a decoding step is bound by how many kernels it launches, not
by the arithmetic: the reference model (respec.engine.model) launches about 50 per layer
(a float32 RMSNorm alone is seven). Here a layer is about 20: q, k and v come from one
matrix product, gate and up from another; RMSNorm is one fused call; RoPE is applied to
q and k together in three kernels; the attention mask is built once per pass (additive,
already laid out for the query heads of a group) instead of once per layer; attention is
three plain kernels, which beat the fused SDPA kernels at a few query tokens.

The fused matrices are copies: ``refresh()`` re-reads the model's weights in place (the
tensors keep their addresses, so captured CUDA graphs stay valid) after every update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from respec.engine.config import ModelConfig
from respec.engine.drafters.eagle import EagleHead
from respec.engine.fast.kernel_layer import KernelLayer
from respec.engine.fast.state import StaticKV, visible_up_to
from respec.engine.model import CausalLM, DecoderLayer


class FusedLayer:
    """A DecoderLayer's forward over [b, T, hidden] with a static KV store; passes of a few
    tokens go through the Triton kernels (kernel_layer.py) where they run."""

    def __init__(self, layer: DecoderLayer, kernels: bool = False) -> None:
        attention = layer.self_attn
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        with torch.no_grad():
            self.qkv_weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            biases = [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
            self.qkv_bias = torch.cat(biases) if biases[0] is not None else None
            self.gate_up_weight = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
            mlp_biases = [layer.mlp.gate_proj.bias, layer.mlp.up_proj.bias]
            self.gate_up_bias = torch.cat(mlp_biases) if mlp_biases[0] is not None else None
        self.kernel_layer = KernelLayer(self) if kernels else None

    def refresh(self) -> None:
        attention, mlp = self.layer.self_attn, self.layer.mlp
        with torch.no_grad():
            torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight], out=self.qkv_weight)
            if self.qkv_bias is not None:
                torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias], out=self.qkv_bias)
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], out=self.gate_up_weight)
            if self.gate_up_bias is not None:
                torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], out=self.gate_up_bias)

    def takes(self, x: Tensor) -> bool:
        """Whether a pass over x [b, T, hidden] runs through the Triton kernels."""
        return self.kernel_layer is not None and self.kernel_layer.takes(x)

    def __call__(self, x: Tensor, rope, mask: Tensor | None, kv: StaticKV, index: int, positions: Tensor) -> Tensor:
        """rope, mask: what PassInputs gives. For the PyTorch layers the (cos, signed sin)
        rows and the additive mask; on the kernels' passes the RoPE table and None: the
        kernels read both the rotation and the visibility at `positions`."""
        if mask is None:
            return self.kernel_layer(x, rope, positions, kv, index)
        layer, (b, t, hidden) = self.layer, x.shape
        normed = F.rms_norm(x, (hidden,), layer.input_layernorm.weight, layer.input_layernorm.eps)
        qkv = F.linear(normed, self.qkv_weight, self.qkv_bias).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        qk = _rotate(qkv[:, :, : self.heads + self.kv_heads], *rope)
        q, k, v = qk[:, :, : self.heads], qk[:, :, self.heads:], qkv[:, :, self.heads + self.kv_heads:]
        keys, values = kv.write_and_read(index, k, v)
        x = x + layer.self_attn.o_proj(_attend(q, keys, values, mask))
        normed = F.rms_norm(x, (hidden,), layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
        gate, up = F.linear(normed, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return x + layer.mlp.down_proj(F.silu(gate) * up)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE on [b, T, heads, D] (HF pairs channel i with i + D/2): x cos + swap(x) sin',
    swap exchanging the halves and sin' = [-sin, sin] carrying rotate_half's sign."""
    b, t, heads, dim = x.shape
    swapped = x.reshape(b, t, heads, 2, dim // 2).flip(3).reshape(b, t, heads, dim)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """q [b, T, H, D], keys/values [b, Hkv, S, D], mask additive [b * Hkv, group * T, S] ->
    [b, T, H * D]. The query heads sharing a K/V head are stacked along the query axis.

    Three plain kernels (scores with the mask added, softmax, weighted values): at a few
    query tokens per row they beat the fused SDPA kernels, which are built for long
    queries (measured on an H200: cuDNN's flash kernel took 15 us per layer at batch 1)."""
    b, t, heads, dim = q.shape
    kv_heads, keys_count = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    folded = q.reshape(b, t, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(b * kv_heads, group * t, dim)
    flat_keys = keys.reshape(b * kv_heads, keys_count, dim).transpose(1, 2)
    scores = torch.baddbmm(mask, folded, flat_keys, alpha=dim**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), values.reshape(b * kv_heads, keys_count, dim))
    return out.reshape(b, kv_heads, group, t, dim).permute(0, 3, 1, 2, 4).reshape(b, t, heads * dim)


class RopeTable:
    """cos and signed sin (see ``_rotate``) of every position, computed once in float32 as
    ``Rotary`` computes them and rounded to the model's dtype: a pass gathers its rows
    (two kernels) instead of computing angles, cos and sin again."""

    def __init__(self, inv_freq: Tensor, positions: int, dtype: torch.dtype, device: torch.device) -> None:
        angles = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv_freq.to(device)
        cos, sin = angles.cos(), angles.sin()
        self.cos = torch.cat([cos, cos], -1).to(dtype)
        self.signed_sin = torch.cat([-sin, sin], -1).to(dtype)

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """[b, T] positions -> cos, signed sin [b, T, 1, D]; positions past the table (rows
        that are done keep stepping) read its last entry instead of out of bounds."""
        index = positions.clamp(max=self.cos.shape[0] - 1)
        return self.cos[index][:, :, None], self.signed_sin[index][:, :, None]


def additive_mask(visible: Tensor, kv_heads: int, group: int, dtype: torch.dtype) -> Tensor:
    """bool [b, 1, T, S] (True = may attend) -> 0 / -inf [b * kv_heads, group * T, S], the
    layout ``_attend`` adds to its scores; built once per pass, shared by every layer."""
    b, _, t, keys = visible.shape
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))
    return mask.repeat(1, kv_heads, group, 1).reshape(b * kv_heads, group * t, keys)


class PassInputs:
    """What a pass derives once from its positions for all its layers: the RoPE rows, and,
    for the PyTorch layers, the additive mask in the layout of the model's grouped-query
    attention. Visibility on the fast path is always a causal prefix (key s is visible to a
    token at position p iff s <= p: ``visible_up_to``), so the Triton kernels need no mask:
    they read the positions."""

    def __init__(self, config: ModelConfig, inv_freq: Tensor, parameter: Tensor) -> None:
        self.kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // self.kv_heads
        self.rope = RopeTable(inv_freq, config.max_position_embeddings, parameter.dtype, parameter.device)

    def __call__(self, positions: Tensor, keys: int, dtype: torch.dtype,
                 mask: bool) -> tuple[tuple[Tensor, Tensor] | RopeTable, Tensor | None]:
        """The PyTorch layers' (cos, signed sin) rows and additive mask; for the kernels'
        passes (mask=False) the RoPE table itself, which they read at the positions."""
        if not mask:
            return self.rope, None
        return self.rope(positions), additive_mask(visible_up_to(positions, keys), self.kv_heads, self.group, dtype)


class FusedModel:
    """CausalLM's cached pass with fused layers: ``run`` returns logits [b, T, V] and the
    hidden states after ``capture`` layers, concatenated ([b, T, len(capture) * hidden])."""

    def __init__(self, model: CausalLM, kernels: bool = False) -> None:
        self.model = model
        self.layers = [FusedLayer(layer, kernels) for layer in model.model.layers]
        self.inputs = PassInputs(model.config, model.rotary.inv_freq, next(model.parameters()))

    def refresh(self) -> None:
        for layer in self.layers:
            layer.refresh()

    def run(self, tokens: Tensor, positions: Tensor, kv: StaticKV,
            capture: tuple[int, ...] = ()) -> tuple[Tensor, Tensor | None]:
        """Tokens [b, T] at `positions` [b, T], each seeing the keys at positions up to its own."""
        model = self.model
        x = model.model.embed_tokens(tokens)
        kernels = self.layers[0].takes(x)
        rope, mask = self.inputs(positions, kv.keys, x.dtype, mask=not kernels)
        captured: dict[int, Tensor] = {}
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, mask, kv, index, positions)
            if index in capture:
                captured[index] = x
        norm = model.model.norm
        logits = model.lm_head(F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps))
        # A layer may be named twice (a shallow model's low and mid layers coincide).
        return logits, (torch.cat([captured[i] for i in capture], dim=-1) if capture else None)


class FusedHead:
    """EagleHead.forward with its decoder layer fused (the head's other parts as they are)."""

    def __init__(self, head: EagleHead, kernels: bool = False) -> None:
        self.head = head
        self.layer = FusedLayer(head.layer, kernels)
        self.inputs = PassInputs(head.config, head.rotary.inv_freq, next(head.parameters()))

    def refresh(self) -> None:
        self.layer.refresh()

    def __call__(self, inputs: Tensor, tokens: Tensor, positions: Tensor, kv: StaticKV) -> Tensor:
        head = self.head
        embedded = F.embedding(tokens, head.target.embed.weight)
        x = head.input_proj(torch.cat([embedded.to(inputs.dtype), inputs], dim=-1))
        rope, mask = self.inputs(positions, kv.keys, x.dtype, mask=not self.layer.takes(x))
        return self.layer(x, rope, mask, kv, 0, positions)
