"""The EAGLE-3 draft head exactly as the EAGLE repository and SpecForge build it, so their
checkpoints run in respec's drafter unchanged.

It differs from respec's own ``EagleHead`` in three ways, and the checkpoint's numbers
only mean something with all three:

- the decoder layer (``midlayer``) normalises the token embedding and the fused feature
  separately (``input_layernorm``, ``hidden_norm``), concatenates them and feeds the
  2H-wide result to q/k/v; its residual is the fused feature itself;
- the head has its own final ``norm`` and ``lm_head`` (trained, not the target's);
- ``lm_head`` may cover a reduced draft vocabulary: draft id d is target id
  ``d + d2t[d]``. Target tokens outside it get a logit of ``OUTSIDE`` (probability 0),
  so the drafter can never propose them.

Everything else (``fc`` over the concatenated low/mid/high features, drafted nodes fed
their parent's output, training-time-test unrolling) is shared with ``EagleHead``, whose
methods this class inherits; only the modules and ``forward``/``logits`` differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from respec.engine.config import ModelConfig
from respec.engine.drafters.eagle import EagleHead, TargetParts
from respec.engine.model import MLP, Attention, RMSNorm, Rotary

# A finite logit for target tokens outside the draft vocabulary: exp() of it is exactly 0
# in float32, so drafting never picks them, while distillation's KL stays finite (the
# outside tokens' target mass adds a constant, their gradient is zero).
OUTSIDE = -1e9


@dataclass(frozen=True)
class Eagle3Spec:
    """What the checkpoint's config.json says about the head, beyond the target's sizes."""

    layer: ModelConfig  # the midlayer's sizes (hidden = the target's), rope, eps
    draft_vocab_size: int
    capture_layers: tuple[int, int, int]  # respec convention: outputs of these target layers
    aux_layer_ids: tuple[int, int, int]  # the same, as EAGLE/vLLM count them (input of layer id)


class Eagle3Layer(nn.Module):
    """EAGLE-3's ``midlayer``: attention over [norm(embedding), norm(feature)], residual
    on the feature, then the usual post-attention norm and SwiGLU MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = Attention(config, layer_index=0)
        # q/k/v read the concatenation, so they are 2H wide (o_proj stays [H, heads * dim]).
        attention = self.self_attn
        self.self_attn.q_proj = nn.Linear(2 * hidden, attention.num_heads * attention.head_dim, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * hidden, attention.num_kv_heads * attention.head_dim, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * hidden, attention.num_kv_heads * attention.head_dim, bias=False)
        self.mlp = MLP(config)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(self, embedded: Tensor, feature: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv) -> Tensor:
        x = torch.cat([self.input_layernorm(embedded), self.hidden_norm(feature)], dim=-1)
        h = feature + self.self_attn(x, cos, sin, mask, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(EagleHead):
    """An ``EagleHead`` with EAGLE-3's own layer, norm, lm_head and vocabulary map; its
    state_dict uses the checkpoint's names (``midlayer.*``, ``fc``, ``norm``, ``lm_head``,
    ``d2t``), so DraftWeights and the distiller's snapshots round-trip unchanged."""

    def __init__(self, target_config: ModelConfig, target: TargetParts, spec: Eagle3Spec) -> None:
        # EagleHead.__init__ would build respec's own modules; this head has others.
        nn.Module.__init__(self)
        hidden = target_config.hidden_size
        self.config = target_config
        self.spec = spec
        self.target = target
        self.capture_layers = spec.capture_layers
        self.fc = nn.Linear(len(spec.capture_layers) * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(spec.layer)
        self.norm = RMSNorm(hidden, spec.layer.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, spec.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))
        self.rotary = Rotary(spec.layer)

    @property
    def layer(self) -> Eagle3Layer:
        """EagleDrafter sizes its key/value cache from ``head.layer.self_attn``."""
        return self.midlayer

    @property
    def full_vocabulary(self) -> bool:
        return self.spec.draft_vocab_size == self.config.vocab_size and not bool(self.d2t.any())

    def draft_to_target(self) -> Tensor:
        """long [draft_vocab]: the target id of every draft id."""
        return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t

    def forward(self, inputs: Tensor, tokens: Tensor, positions: Tensor, mask: Tensor, kv=None) -> Tensor:
        """As ``EagleHead.forward``: inputs are fused features (or a parent's output)."""
        embedded = F.embedding(tokens, self.target.embed.weight.detach()).to(inputs.dtype)
        cos, sin = self.rotary.cos_sin(positions, inputs.dtype)
        return self.midlayer(embedded, inputs, cos, sin, mask, kv)

    def draft_logits(self, hidden: Tensor) -> Tensor:
        """[..., draft_vocab]: the head's own logits, before mapping to target ids."""
        return self.lm_head(self.norm(hidden))

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., target vocab]; tokens outside the draft vocabulary get ``OUTSIDE``."""
        draft = self.draft_logits(hidden)
        if self.full_vocabulary:
            return draft
        full = draft.new_full((*draft.shape[:-1], self.config.vocab_size), OUTSIDE)
        return full.index_copy(-1, self.draft_to_target(), draft)

    def argmax_tokens(self, hidden: Tensor) -> Tensor:
        """Greedy draft tokens as target ids (the RMS scale leaves the argmax alone)."""
        draft = F.linear(hidden * self.norm.weight, self.lm_head.weight).argmax(-1)
        return draft if self.full_vocabulary else self.draft_to_target()[draft]

    def save(self, directory: str | Path) -> Path:
        """Write the EAGLE-3 checkpoint layout (config.json + model.safetensors)."""
        from respec.interop.eagle3_checkpoint import save_eagle3_head

        return save_eagle3_head(self, directory)
