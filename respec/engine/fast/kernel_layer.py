"""A fused decoder layer's forward through the Triton kernels of ``kernels.py``: five
kernels per layer for passes of up to ``MAX_ROWS`` tokens (decoding, verification and
drafting at small batch), where a layer is bound by kernel count, not by arithmetic; four
for a pass of one row with attention and the output product in one kernel (attend_o,
opt-in: kernels.ATTEND_O).

Longer passes (verification and the head's catch-up at the RL batch: 64 rows x 3-5
tokens) take the wide route: the four products through cuBLAS, whose GEMMs run near the
tensor cores' speed there, and between them the RMSNorms, one kernel that rotates q and k
and stores k and v (rope_store), the attention kernel, and one SiLU-and-multiply: nine
kernels a layer, where PyTorch's layers launch ~23 and build a mask over every key.

It reads the FusedLayer's own tensors (the stacked qkv and gate-up matrices, the norms),
so ``FusedLayer.refresh`` keeps it current and captured graphs stay valid.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from respec.engine.fast.state import StaticKV


def kernels_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """The default: on CUDA when Triton imports, for bf16/fp16 weights on a GPU with bf16
    tensor cores (compute capability 8.0 on: tl.dot; float32 would go through TF32 there,
    not the float32 the PyTorch layers compute). RESPEC_KERNELS=0 turns them off. On a CPU
    they run only when asked for, under Triton's interpreter (the tests)."""
    if os.environ.get("RESPEC_KERNELS", "1") == "0" or device.type != "cuda":
        return False
    if dtype not in (torch.bfloat16, torch.float16) or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class KernelLayer:
    """FusedLayer's forward (x [b, T, hidden] -> [b, T, hidden]) over the kernels."""

    def __init__(self, fused) -> None:
        from respec.engine.fast import kernels  # Triton: imported only where it runs

        self.kernels, self.fused = kernels, fused

    def takes(self, x: Tensor) -> bool:
        """Passes whose attention block (the query heads of a KV head x the row's tokens)
        fits the one the attention kernel is built for: the GEMV kernels' up to MAX_ROWS
        tokens, the wide route's past that."""
        fused, t = self.fused, x.shape[1]
        return fused.heads // fused.kv_heads * t <= self.kernels.MAX_QUERY_ROWS

    def _wide(self, b: int, t: int) -> bool:
        return b * t > self.kernels.MAX_ROWS  # read at each call: a bench may move the line

    def _attention_and_output_in_one(self, b: int, t: int, keys: int) -> bool:
        kernels = self.kernels
        return kernels.ATTEND_O and b == 1 and t <= kernels.ATTEND_O_MAX_TOKENS and keys <= kernels.ATTEND_O_MAX_KEYS

    def __call__(self, x: Tensor, rope, positions: Tensor, kv: StaticKV, index: int) -> Tensor:
        """As FusedLayer: rope is the RoPE table (fused.RopeTable), read at `positions`, and
        each token sees the keys at positions up to its own."""
        # The layer's own parameters are read at each call, as the PyTorch path reads them:
        # a captured graph holds the tensors they were at capture.
        kernels, fused, layer = self.kernels, self.fused, self.fused.layer
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        input_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
        b, t, hidden = x.shape
        if self._wide(b, t):
            return self._wide_pass(x, rope, positions, kv, index)
        flat = x.reshape(b * t, hidden)
        k_store, v_store = kv.k_store[index], kv.v_store[index]
        q = kernels.qkv_rope(flat, fused.qkv_weight, (input_norm.weight, input_norm.eps), fused.qkv_bias, rope.cos,
                             rope.signed_sin, positions, kv.write_at, k_store, v_store, fused.heads, fused.kv_heads)
        if self._attention_and_output_in_one(b, t, k_store.shape[2]):
            flat = kernels.attend_o(q, k_store, v_store, positions, o_proj.weight, o_proj.bias, flat)
        else:
            attended = kernels.attend(q, k_store, v_store, positions, t)
            flat = kernels.gemv(attended, o_proj.weight, hidden, bias=o_proj.bias, residual=flat)
        act = kernels.gemv(flat, fused.gate_up_weight, down_proj.in_features, norm=(post_norm.weight, post_norm.eps),
                           bias=fused.gate_up_bias, gated=True)
        flat = kernels.gemv(act, down_proj.weight, hidden, bias=down_proj.bias, residual=flat)
        return flat.view(b, t, hidden)

    def _wide_pass(self, x: Tensor, rope, positions: Tensor, kv: StaticKV, index: int) -> Tensor:
        """The wide route (module docstring): products in cuBLAS, the rest in four kernels."""
        kernels, fused, layer = self.kernels, self.fused, self.fused.layer
        attention, mlp = layer.self_attn, layer.mlp
        b, t, hidden = x.shape
        flat = x.reshape(b * t, hidden)
        k_store, v_store = kv.k_store[index], kv.v_store[index]
        normed = F.rms_norm(flat, (hidden,), layer.input_layernorm.weight, layer.input_layernorm.eps)
        qkv = F.linear(normed, fused.qkv_weight, fused.qkv_bias)
        q = kernels.rope_store(qkv, rope.cos, rope.signed_sin, positions, kv.write_at, k_store, v_store, fused.heads,
                               fused.kv_heads)
        flat = _plus_product(flat, kernels.attend(q, k_store, v_store, positions, t), attention.o_proj)
        normed = F.rms_norm(flat, (hidden,), layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
        act = kernels.silu_mul(F.linear(normed, fused.gate_up_weight, fused.gate_up_bias))
        return _plus_product(flat, act, mlp.down_proj).view(b, t, hidden)


def _plus_product(residual: Tensor, x: Tensor, linear: torch.nn.Linear) -> Tensor:
    """residual + linear(x): one cuBLAS call (the add in its epilogue) where there is no bias."""
    if linear.bias is None:
        return torch.addmm(residual, x, linear.weight.t())
    return residual + linear(x)
