"""An EAGLE-3-style draft head: one decoder layer over the target's own hidden states.

What the head reads at sequence position j (features and logits of one target pass):

    f_j      the target's hidden states at token j after a low, a middle and a high
             layer, concatenated ([3 * hidden]; ``layers_to_capture``)
    x_{j+1}  the token that followed token j

and from them it predicts token j + 2, i.e. the target's distribution at token j + 1.

Architecture (chosen: concatenation, then one linear, then one standard layer):

    fused  = fc(f_j)                                  [3H] -> [H]
    x      = input_proj([embed(x_{j+1}), fused])      [2H] -> [H]
    h      = DecoderLayer(x)                          causal attention over the row's context
    logits = lm_head(norm(h))                         the target's final norm and lm_head

The embeddings, the final norm and lm_head are the target's own tensors, read through
``detach()``: shared (no copy, so they follow every policy update) and frozen (the
head's optimiser never touches them, and no gradient lands on the policy).

Drafting deeper than one step has no target feature for the drafted tokens, so (as in
EAGLE-3) a drafted node's input is its parent's output ``h`` in place of ``fused``.
``distill_loss`` trains teacher-forced on target features only; deeper drafts are
therefore less accurate than the first one, which costs acceptance, never exactness.

Cost: no draft KV cache. Each proposal re-runs the head over the row's last
``feature_window`` positions plus the tree so far, once per drafting step; for a
one-layer head over a window of ~16 that is cheap next to a target pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from respec.engine.config import ModelConfig
from respec.engine.drafters.base import Drafter, DraftProposal, DraftRequest
from respec.engine.model import CausalLM, DecoderLayer, RMSNorm, Rotary
from respec.engine.tree import DraftTree, TopNTreeBuilder, build_topn_tree

HEAD_FORMAT = "respec-eagle3-head-v1"
WEIGHTS_FILE = "eagle_head.safetensors"
CONFIG_FILE = "eagle_head.json"


def layers_to_capture(config: ModelConfig) -> tuple[int, int, int]:
    """(low, mid, high) target layers whose outputs the head fuses: (1, L // 2, L - 2),
    clamped so that low <= mid <= high are real layers even for 1- or 2-layer models."""
    last = config.num_hidden_layers - 1
    low = min(1, last)
    high = max(last - 1, low)
    mid = min(max(config.num_hidden_layers // 2, low), high)
    return low, mid, high


@dataclass(frozen=True)
class TargetParts:
    """The target's modules the head reads but never owns (not submodules of the head, so
    they are neither in its state_dict nor among its parameters)."""

    embed: nn.Embedding
    norm: RMSNorm
    lm_head: nn.Linear

    @classmethod
    def of(cls, target: CausalLM) -> TargetParts:
        return cls(target.embed_tokens, target.model.norm, target.lm_head)


class EagleHead(nn.Module):
    """fc + input_proj + one decoder layer; see the module docstring."""

    def __init__(self, config: ModelConfig, target: TargetParts, capture_layers: tuple[int, ...]) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.target = target
        self.capture_layers = tuple(capture_layers)
        self.fc = nn.Linear(len(self.capture_layers) * hidden, hidden, bias=False)
        self.input_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = DecoderLayer(config, layer_index=0)
        self.rotary = Rotary(config)

    @classmethod
    def for_target(cls, target: CausalLM, capture_layers: tuple[int, ...] | None = None) -> EagleHead:
        """A freshly initialised head sized, typed and placed like `target`."""
        layers = capture_layers if capture_layers is not None else layers_to_capture(target.config)
        parameter = next(target.parameters())
        head = cls(target.config, TargetParts.of(target), layers)
        return head.to(device=parameter.device, dtype=parameter.dtype)

    # ------------------------------------------------------------------ the pieces

    def fuse(self, features: Tensor) -> Tensor:
        """[..., layers * hidden] target features -> [..., hidden]."""
        return self.fc(features)

    def forward(self, inputs: Tensor, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """inputs [B, T, H] (fused features or a parent's h), tokens long [B, T], positions
        long [B, T], mask bool [B, 1, T, T] (True = may attend) -> h [B, T, H]."""
        embedded = F.embedding(tokens, self.target.embed.weight.detach())
        x = self.input_proj(torch.cat([embedded.to(inputs.dtype), inputs], dim=-1))
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        return self.layer(x, cos, sin, mask, None)

    def logits(self, hidden: Tensor) -> Tensor:
        """The target's final norm and lm_head over h, without gradients into the target."""
        norm = self.target.norm
        x32 = hidden.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(hidden.dtype)
        lm_head = self.target.lm_head
        bias = None if lm_head.bias is None else lm_head.bias.detach()
        return F.linear(norm.weight.detach() * normed, lm_head.weight.detach(), bias)

    def teacher_forced(self, features: Tensor, tokens: Tensor) -> Tensor:
        """Logits [B, T - 1, V] at positions 1..T-1 of a sequence: position j's input is
        (features[j - 1], tokens[j]), so they line up with the target's logits[:, 1:]."""
        inputs = self.fuse(features[:, :-1])
        t = inputs.shape[1]
        positions = torch.arange(t, device=tokens.device).expand(tokens.shape[0], t)
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        return self.logits(self(inputs, tokens[:, 1:], positions, causal.expand(tokens.shape[0], 1, t, t)))

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | Path) -> Path:
        """The head's own weights (safetensors) and a small json config; not the target's."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE)
        config = {
            "format": HEAD_FORMAT,
            "capture_layers": list(self.capture_layers),
            "hidden_size": self.config.hidden_size,
            "vocab_size": self.config.vocab_size,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, target: CausalLM) -> EagleHead:
        """A head saved by ``save``, attached to `target` (which must have the same sizes)."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("format") != HEAD_FORMAT:
            raise ValueError(f"{directory / CONFIG_FILE}: not a {HEAD_FORMAT} config")
        for key in ("hidden_size", "vocab_size"):
            if config[key] != getattr(target.config, key):
                raise ValueError(
                    f"{directory}: the head has {key}={config[key]}, the target {getattr(target.config, key)}"
                )
        head = cls.for_target(target, tuple(config["capture_layers"]))
        head.load_state_dict(load_file(directory / WEIGHTS_FILE, device=str(next(target.parameters()).device)))
        return head


# ---------------------------------------------------------------------- training


def distill_loss(
    head: EagleHead,
    target_features: Tensor,
    tokens: Tensor,
    target_logits: Tensor,
    weights: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Mean over samples of weight_b * KL(target || draft), teacher-forced.

    All inputs come from one target pass over the sequences ``tokens`` [B, T]:
    target_features [B, T, layers * H] (``forward(..., capture_layers=head.capture_layers)``,
    concatenated), target_logits [B, T, V]. weights [B] (e.g. rewards) scale each sample's
    mean KL, so scaling them scales the loss; valid [B, T] (1 = real token) drops padding.
    """
    draft = head.teacher_forced(target_features, tokens).float()
    target_logp = F.log_softmax(target_logits[:, 1:].float(), dim=-1)
    kl = (target_logp.exp() * (target_logp - F.log_softmax(draft, dim=-1))).sum(-1)  # [B, T - 1]
    real = torch.ones_like(kl) if valid is None else valid[:, 1:].to(kl.dtype)
    per_sample = (kl * real).sum(1) / real.sum(1).clamp(min=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.dtype)
    return per_sample.mean()


# ---------------------------------------------------------------------- drafting


class _DraftSequence:
    """One proposal's positions for all rows: the feature window, then drafted nodes.

    The head is re-run over every position after each append (no draft KV cache), so
    the sequence keeps only each position's inputs, visibility and latest output h.
    """

    def __init__(self, head: EagleHead, inputs: Tensor, tokens: Tensor, positions: Tensor, visible: Tensor):
        self.head = head
        self.inputs, self.tokens, self.positions, self.visible = inputs, tokens, positions, visible
        self.root = tokens.shape[1] - 1  # the window's last position: its token is the root
        self.hidden = self._run()

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def _run(self) -> Tensor:
        return self.head(self.inputs, self.tokens, self.positions, self.visible[:, None])

    def append(self, parents: Tensor, tokens: Tensor) -> Tensor:
        """Add one node per (row, column) under sequence positions parents [B, k]; returns
        the new nodes' h [B, k, H]. A node sees its parent's context, its parent and itself."""
        b, k = parents.shape
        size = self.tokens.shape[1]
        gather = parents[..., None]
        parent_h = self.hidden.gather(1, gather.expand(-1, -1, self.hidden.shape[-1]))
        seen = self.visible.gather(1, gather.expand(-1, -1, size))  # the parent's row
        seen = seen.scatter(2, parents[..., None], True)
        grown = torch.zeros(b, size + k, size + k, dtype=torch.bool, device=self.visible.device)
        grown[:, :size, :size] = self.visible
        grown[:, size:, :size] = seen
        grown[:, size:, size:] = torch.eye(k, dtype=torch.bool, device=grown.device)
        self.visible = grown
        self.inputs = torch.cat([self.inputs, parent_h], dim=1)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.positions = torch.cat([self.positions, self.positions.gather(1, parents) + 1], dim=1)
        self.hidden = self._run()
        return self.hidden[:, size:]


class EagleDrafter(Drafter):
    """Top-t trees from an ``EagleHead`` over the target's features (deterministic drafts,
    so ``draft_probs`` is None and the deterministic acceptance rule is exact)."""

    needs_features = True

    def __init__(self, target: CausalLM, head: EagleHead | None = None, feature_window: int = 16) -> None:
        if feature_window < 1:
            raise ValueError(f"EagleDrafter needs feature_window >= 1, got {feature_window}")
        self.head = head if head is not None else EagleHead.for_target(target)
        self.capture_layers = self.head.capture_layers  # SpeculativeEngine wires these into the target
        self.feature_window = feature_window  # RowBook keeps this many features per row
        self.version = 0

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        """Distilled head weights (the head's own state_dict; the target's parts are shared)."""
        self.head.load_state_dict(state_dict)
        self.version = version

    def propose(self, request: DraftRequest) -> DraftProposal:
        if request.features is None:
            raise ValueError(
                "EagleDrafter needs target features: run the target with capture_layers=drafter.capture_layers"
            )
        shape = request.shape
        with torch.no_grad():
            sequence = self._window(request)
            root_probs = self._probs(sequence.hidden[:, -1])
            ran: list[tuple[Tensor, Tensor]] = []

            def next_probs(builder: TopNTreeBuilder) -> Tensor:
                return self._expand(sequence, builder, ran)

            tree = build_topn_tree(root_probs, next_probs, shape.steps, shape.branch, shape.num_draft)
        return DraftProposal(pad_tree(tree, shape.num_draft))

    def _window(self, request: DraftRequest) -> _DraftSequence:
        """The last W committed positions of every row, left-padded: position i holds
        (feature of token L-1-W+i, token L-W+i); the last one's token is the root."""
        features = request.features[:, -self.feature_window:].to(next(self.head.parameters()).dtype)
        b, width = features.shape[:2]
        device = features.device
        real = torch.tensor([min(width, len(h) - 1) for h in request.histories], device=device)
        tokens = torch.zeros(b, width, dtype=torch.long, device=device)
        for row, history in enumerate(request.histories):
            count = int(real[row])
            tokens[row, width - count:] = history[len(history) - count:].to(device)
        index = torch.arange(width, device=device)
        is_real = index >= (width - real)[:, None]  # [B, W]
        positions = (index - (width - real)[:, None]).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        visible = (causal & is_real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
        return _DraftSequence(self.head, self.head.fuse(features), tokens, positions, visible)

    def _expand(self, sequence: _DraftSequence, builder: TopNTreeBuilder, ran: list[tuple[Tensor, Tensor]]) -> Tensor:
        """q [B, t, V] at the builder's frontier, after adding the frontier to the sequence.
        ran: (pool indices [B, t], sequence positions [B, t]) of every frontier run so far."""
        b, t = builder.frontier.shape
        seq_of_pool = torch.full((b, builder.pool_size), -1, dtype=torch.long, device=builder.frontier.device)
        for pool_index, positions in ran:
            seq_of_pool.scatter_(1, pool_index, positions)
        pool_parents = builder.pool_tree().parents.gather(1, builder.frontier)
        # Children of the root hang under the window's last position, which read the root token.
        parents = torch.where(pool_parents < 0, sequence.root, seq_of_pool.gather(1, pool_parents.clamp(min=0)))
        first_new = sequence.length
        hidden = sequence.append(parents, builder.frontier_tokens())
        new_positions = first_new + torch.arange(t, device=parents.device)
        ran.append((builder.frontier.clone(), new_positions.expand(b, t)))
        return self._probs(hidden)

    def _probs(self, hidden: Tensor) -> Tensor:
        return torch.softmax(self.head.logits(hidden).float(), dim=-1)


def pad_tree(tree: DraftTree, width: int) -> DraftTree:
    """The same tree with exactly `width` node slots per row (padding: token 0 under the
    root), since the verifier's shape is fixed by n even when fewer candidates exist."""
    missing = width - tree.width
    if missing <= 0:
        return tree
    b = tree.batch_size
    zeros = torch.zeros(b, missing, dtype=torch.long, device=tree.device)
    return DraftTree.from_parents(
        torch.cat([tree.tokens, zeros], 1), torch.cat([tree.parents, zeros - 1], 1), tree.num_nodes
    )
