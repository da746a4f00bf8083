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

    def forward(self, inputs: Tensor, tokens: Tensor, positions: Tensor, mask: Tensor, kv=None) -> Tensor:
        """inputs [B, T, H] (fused features or a parent's h), tokens long [B, T], positions
        long [B, T], mask bool [B, 1, T, S] (True = may attend) -> h [B, T, H]. Without `kv`
        S = T; with it (an object with the target cache's ``store_and_read``) the T new
        keys/values are stored there and the S it returns are attended to."""
        embedded = F.embedding(tokens, self.target.embed.weight.detach())
        x = self.input_proj(torch.cat([embedded.to(inputs.dtype), inputs], dim=-1))
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        return self.layer(x, cos, sin, mask, kv)

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
        return self.unrolled(features, tokens, 1)[0]

    def unrolled(self, features: Tensor, tokens: Tensor, steps: int) -> list[Tensor]:
        """Logits [B, T - 1, V] of drafting steps 1..steps, teacher-forced on the tokens
        (EAGLE-3's training-time test): what the head predicts at each position when it is
        the k-th drafted node, i.e. its input is its parent's h from step k - 1, and the
        k - 1 positions before it were drafted too. Step 1 is ``teacher_forced``.

        Step s at position p sees positions <= p - s + 1 as the target computed them (step
        1 keys/values) and position p - s + j as drafted at step j, for j = 2..s: exactly
        the keys a chain drafted from root p - s + 1 attends to. Positions p < s - 1 have
        no such root; their logits are computed but mean nothing (``distill_loss`` skips them).
        """
        t = tokens.shape[1] - 1
        positions = torch.arange(t, device=tokens.device).expand(tokens.shape[0], t)
        kv = _StackedKV()
        inputs, outputs = self.fuse(features[:, :-1]), []
        for step in range(1, steps + 1):
            mask = _unrolled_mask(t, step, tokens.device).expand(tokens.shape[0], 1, t, step * t)
            hidden = self(inputs, tokens[:, 1:], positions, mask, kv)
            outputs.append(self.logits(hidden))
            inputs = F.pad(hidden[:, :-1], (0, 0, 1, 0))  # position p reads its parent p - 1
        return outputs

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


class _StackedKV:
    """Keys/values of every unrolled step, stacked along the key axis (step-major)."""

    def __init__(self) -> None:
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


def _unrolled_mask(t: int, step: int, device: torch.device) -> Tensor:
    """bool [t, step * t]: what position p of unrolled step `step` sees (``EagleHead.unrolled``):
    step 1's keys q <= p - step + 1, and step j's key p - step + j for j = 2..step."""
    query = torch.arange(t, device=device)[:, None]
    key = torch.arange(t, device=device)[None, :]
    blocks = [key <= query - step + 1]
    blocks += [key == query - step + j for j in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


def distill_loss(
    head: EagleHead,
    target_features: Tensor,
    tokens: Tensor,
    target_logits: Tensor,
    weights: Tensor | None = None,
    valid: Tensor | None = None,
    steps: int = 1,
) -> Tensor:
    """Mean over samples of weight_b * KL(target || draft), teacher-forced.

    All inputs come from one target pass over the sequences ``tokens`` [B, T]:
    target_features [B, T, layers * H] (``forward(..., capture_layers=head.capture_layers)``,
    concatenated), target_logits [B, T, V]. weights [B] (e.g. rewards) scale each sample's
    mean KL, so scaling them scales the loss; valid [B, T] (1 = real token) drops padding.
    steps > 1 also trains drafting steps 2..steps (``EagleHead.unrolled``), the mean KL
    of each step weighing the same: without it a drafted node's input (its parent's h)
    is one the head never saw in training, and acceptance falls off after the first token.
    """
    target_logp = F.log_softmax(target_logits[:, 1:].float(), dim=-1)
    real = torch.ones(target_logp.shape[:2], device=tokens.device) if valid is None else valid[:, 1:].float()
    total = 0.0
    for step, draft in enumerate(head.unrolled(target_features, tokens, steps), start=1):
        kl = (target_logp.exp() * (target_logp - F.log_softmax(draft.float(), dim=-1))).sum(-1)  # [B, T - 1]
        counted = real.clone()
        counted[:, : step - 1] = 0  # no root for the first step - 1 positions
        per_sample = (kl * counted).sum(1) / counted.sum(1).clamp(min=1)
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.dtype)
        total = total + per_sample.mean()
    return total / steps


# ---------------------------------------------------------------------- drafting


class _DraftKV:
    """The head's keys and values during one proposal: the window's, then each drafted
    level's appended. The decoder layer calls ``store_and_read`` exactly as it does on the
    target's cache, so a new level runs over its own nodes only and reads the rest here."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class _DraftSequence:
    """One proposal's positions for all rows: the feature window, then drafted nodes.

    The window runs through the head once; each drafted level then runs over its new
    nodes only, attending to the cached keys/values (``_DraftKV``) of what it may see.
    Buffers are sized for the whole proposal up front, so a level writes in place.
    """

    def __init__(self, head: EagleHead, window: _Window, extra: int):
        b, width = window.tokens.shape
        size = width + extra
        device = window.tokens.device
        self.head, self.kv, self.length = head, _DraftKV(), width
        self.root = width - 1  # the window's last position: its token is the root
        self.visible = torch.zeros(b, size, size, dtype=torch.bool, device=device)
        self.visible[:, :width, :width] = window.visible
        self.positions = torch.zeros(b, size, dtype=torch.long, device=device)
        self.positions[:, :width] = window.positions
        hidden = head(window.inputs, window.tokens, window.positions, window.visible[:, None], self.kv)
        self.hidden = hidden.new_zeros(b, size, hidden.shape[-1])
        self.hidden[:, :width] = hidden

    def append(self, parents: Tensor, tokens: Tensor) -> Tensor:
        """Add one node per (row, column) under sequence positions parents [B, k]; returns
        the new nodes' h [B, k, H]. A node sees its parent's context, its parent and itself."""
        k, start = parents.shape[1], self.length
        new = slice(start, start + k)
        parent_h = self.hidden.gather(1, parents[..., None].expand(-1, -1, self.hidden.shape[-1]))
        seen = self.visible.gather(1, parents[..., None].expand(-1, -1, self.visible.shape[-1]))
        seen.scatter_(2, parents[..., None], True)
        seen[:, :, new] = torch.eye(k, dtype=torch.bool, device=seen.device)
        self.visible[:, new] = seen
        self.positions[:, new] = self.positions.gather(1, parents) + 1
        self.length += k
        hidden = self.head(parent_h, tokens, self.positions[:, new], seen[:, None, :, : self.length], self.kv)
        self.hidden[:, new] = hidden
        return hidden


@dataclass(frozen=True)
class _Window:
    """The head's inputs over the last W committed positions of every row, left-padded."""

    inputs: Tensor  # [B, W, H] fused target features
    tokens: Tensor  # long [B, W]
    positions: Tensor  # long [B, W]
    visible: Tensor  # bool [B, W, W]: causal over the row's real positions (padding sees itself)
    is_real: Tensor  # bool [B, W]


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
            window = self._window(request)
            if shape.is_chain:
                return DraftProposal(self._chain(window, min(shape.steps, shape.num_draft)))
            sequence = _DraftSequence(self.head, window, (shape.steps - 1) * shape.branch)
            root_probs = self._probs(sequence.hidden[:, sequence.root])
            seq_of_pool = torch.full((window.tokens.shape[0], shape.max_nodes), -1, dtype=torch.long,
                                     device=window.tokens.device)

            def next_probs(builder: TopNTreeBuilder) -> Tensor:
                return self._expand(sequence, builder, seq_of_pool)

            tree = build_topn_tree(root_probs, next_probs, shape.steps, shape.branch, shape.num_draft)
        return DraftProposal(pad_tree(tree, shape.num_draft))

    def _window(self, request: DraftRequest) -> _Window:
        """The last W committed positions of every row, left-padded: position i holds
        (feature of token L-1-W+i, token L-W+i); the last one's token is the root."""
        features = request.features[:, -self.feature_window:].to(next(self.head.parameters()).dtype)
        b, width = features.shape[:2]
        device = features.device
        counts = [min(width, len(h) - 1) for h in request.histories]
        tokens = torch.zeros(b, width, dtype=torch.long, device=device)
        for row, (history, count) in enumerate(zip(request.histories, counts, strict=True)):
            tokens[row, width - count:] = history[len(history) - count:].to(device)
        index = torch.arange(width, device=device)
        first_real = width - torch.tensor(counts, device=device)[:, None]
        is_real = index >= first_real  # [B, W]
        positions = (index - first_real).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        visible = (causal & is_real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
        return _Window(self.head.fuse(features), tokens, positions, visible, is_real)

    def _chain(self, window: _Window, length: int) -> DraftTree:
        """The head's argmax, `length` times: what top-1 trees are, without their bookkeeping.
        Each node sees the row's real window positions and every earlier node."""
        b, width = window.tokens.shape
        kv = _DraftKV()
        hidden = self.head(window.inputs, window.tokens, window.positions, window.visible[:, None], kv)[:, -1:]
        seen = torch.ones(b, 1, 1, width + length, dtype=torch.bool, device=hidden.device)
        seen[:, 0, 0, :width] = window.is_real
        position = window.positions[:, -1:]
        token = self._argmax(hidden)
        drafted = [token]
        for level in range(1, length):
            position = position + 1
            hidden = self.head(hidden, token, position, seen[..., : width + level], kv)
            token = self._argmax(hidden)
            drafted.append(token)
        tokens = torch.cat(drafted, dim=1)
        parents = torch.arange(-1, length - 1, device=tokens.device).expand(b, length)
        return DraftTree(tokens, parents, torch.full((b,), length, dtype=torch.long, device=tokens.device))

    def _expand(self, sequence: _DraftSequence, builder: TopNTreeBuilder, seq_of_pool: Tensor) -> Tensor:
        """q [B, t, V] at the builder's frontier, after adding the frontier to the sequence.
        seq_of_pool [B, pool]: the sequence position of every pool node run so far (-1: none)."""
        frontier = builder.frontier
        pool_parents = builder.frontier_parents()
        # Children of the root hang under the window's last position, which read the root token.
        parents = torch.where(pool_parents < 0, sequence.root, seq_of_pool.gather(1, pool_parents.clamp(min=0)))
        first_new = sequence.length
        hidden = sequence.append(parents, builder.frontier_tokens())
        seq_of_pool.scatter_(1, frontier, first_new + torch.arange(frontier.shape[1], device=frontier.device)
                             .expand_as(frontier))
        return self._probs(hidden)

    def _probs(self, hidden: Tensor) -> Tensor:
        return torch.softmax(self.head.logits(hidden).float(), dim=-1)

    def _argmax(self, hidden: Tensor) -> Tensor:
        return self.head.logits(hidden).argmax(-1)


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
