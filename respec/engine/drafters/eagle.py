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

``distill_loss(steps=k)`` also trains drafting steps 2..k that way (EAGLE-3's training-time
test, ``EagleHead.unrolled``), which is what makes the deeper drafts acceptable.

Cost: the drafter keeps the head's keys/values of every row's committed positions
(``_HeadCache``), so a proposal runs the head over the row's new positions (root and
the tokens accepted since the last one), then once per tree level over that level's nodes.
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

    @staticmethod
    def state_of(target: CausalLM) -> dict[str, Tensor]:
        """Copies of these tensors under the target's state_dict names (load them with
        ``strict=False``): all a head needs of a newer version of its target. Tied
        embeddings are one tensor under two names: copied once (a real vocabulary's are
        hundreds of MB)."""
        prefixes = ("model.embed_tokens.", "model.norm.", "lm_head.")
        copies: dict[int, Tensor] = {}
        state = {}
        for name, tensor in target.state_dict().items():
            if name.startswith(prefixes):
                if tensor.data_ptr() not in copies:
                    copies[tensor.data_ptr()] = tensor.detach().clone()
                state[name] = copies[tensor.data_ptr()]
        return state


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
        long [B, T], mask bool [B, 1, T, S] (True = may attend; None: all) -> h [B, T, H]. Without `kv`
        S = T; with it (an object with the target cache's ``store_and_read``) the T new
        keys/values are stored there and the S it returns are attended to."""
        embedded = F.embedding(tokens, self.target.embed.weight.detach())
        x = self.input_proj(torch.cat([embedded.to(inputs.dtype), inputs], dim=-1))
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        return self.layer(x, cos, sin, mask, kv)

    def argmax_tokens(self, hidden: Tensor) -> Tensor:
        """The greedy draft token of each h (what ``logits(hidden).argmax(-1)`` gives)."""
        target = self.target
        if target.lm_head.bias is not None:
            return self.logits(hidden).argmax(-1)
        # RMSNorm divides each row by a positive scalar, which leaves its argmax alone:
        # skip the normalisation (a handful of small ops per drafted token).
        return F.linear(hidden * target.norm.weight, target.lm_head.weight).argmax(-1)

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
        """A head saved by ``save``, attached to `target` (which must have the same sizes),
        or one in the public EAGLE-3 layout (config.json + weights; ``respec.interop``)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            from respec.interop.eagle3_checkpoint import is_eagle3_checkpoint, load_eagle3_head

            if is_eagle3_checkpoint(directory):
                return load_eagle3_head(directory, target)
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

_OPENING = 8  # tokens of a history that identify its sequence in the head's cache


class _DraftKV:
    """Keys/values one head pass attends to: a fixed prefix (the rows' cached committed
    positions), then whatever the passes store (drafted nodes, level by level). The decoder
    layer calls ``store_and_read`` as it does on the target's cache."""

    def __init__(self, k: Tensor | None = None, v: Tensor | None = None) -> None:
        self.k, self.v = k, v

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class _HeadCache:
    """The head's keys/values at every row's committed positions, kept across proposals.

    A committed position's key/value depends only on the target's feature and token there
    and on the positions before it, so it never changes once computed: a proposal runs
    the head over the row's new committed positions only (the root and the tokens accepted
    since the last proposal) instead of over a whole window. Store index i of a slot holds
    head position ``starts[slot] + i``; a row first seen late (or after ``clear``) starts
    at the oldest position whose feature it was given.
    """

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = torch.zeros(0, kv_heads, 1, head_dim, dtype=dtype, device=device)
        self.v = self.k.clone()
        self.lengths: list[int] = []
        self.starts: list[int] = []
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.openings: dict[int, tuple[int, ...]] = {}  # slot -> its sequence's first tokens

    def clear(self) -> None:
        """Forget every row (new head weights make every cached key stale)."""
        self.free += list(self.slot_of.values())
        self.slot_of.clear()

    def forget(self, row_id: int) -> None:
        slot = self.slot_of.pop(row_id, None)
        if slot is not None:
            self.free.append(slot)

    def slot(self, row_id: int) -> int:
        """The row's slot, a fresh empty one for a row not seen since ``forget``/``clear``."""
        if row_id not in self.slot_of:
            if not self.free:
                self._grow(slots=max(4, 2 * len(self.lengths)), capacity=self.capacity)
            self.slot_of[row_id] = slot = self.free.pop()
            self.lengths[slot], self.starts[slot] = 0, 0
        return self.slot_of[row_id]

    @property
    def capacity(self) -> int:
        return self.k.shape[2] - 1  # the last column absorbs padding writes

    def reserve(self, length: int) -> None:
        if length > self.capacity:
            self._grow(slots=len(self.lengths), capacity=max(2 * self.capacity, length, 64))

    def _grow(self, slots: int, capacity: int) -> None:
        old_slots, old_capacity = self.k.shape[0], self.capacity
        k = self.k.new_zeros(slots, self.k.shape[1], capacity + 1, self.k.shape[3])
        v = k.clone()
        k[:old_slots, :, :old_capacity] = self.k[:, :, :old_capacity]
        v[:old_slots, :, :old_capacity] = self.v[:, :, :old_capacity]
        self.k, self.v = k, v
        self.free += list(range(slots - 1, old_slots - 1, -1))
        self.lengths += [0] * (slots - old_slots)
        self.starts += [0] * (slots - old_slots)


class _StoreNew:
    """``store_and_read`` for the pass over new committed positions: writes their keys/values
    after each row's cached ones (padding columns to the spare one), reads the rows back.
    One row (batch 1) writes a slice and reads a view: a few ops instead of a dozen."""

    def __init__(self, cache: _HeadCache, slots: list[int], write_at: Tensor, read_length: int) -> None:
        self.cache, self.write_at, self.read_length = cache, write_at, read_length
        self.slots = torch.tensor(slots, device=write_at.device)
        self.single = slots[0] if len(slots) == 1 else None

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cache, length = self.cache, self.read_length
        if self.single is not None:
            # One row has no padding columns: its entries end exactly at read_length.
            row = slice(self.single, self.single + 1)
            cache.k[self.single, :, length - k.shape[2]: length] = k[0]
            cache.v[self.single, :, length - k.shape[2]: length] = v[0]
            self.read = cache.k[row, :, :length], cache.v[row, :, :length]
            return self.read
        rows = self.slots[:, None]
        cache.k[rows, :, self.write_at] = k.transpose(1, 2)
        cache.v[rows, :, self.write_at] = v.transpose(1, 2)
        self.read = cache.k[self.slots, :, :length], cache.v[self.slots, :, :length]
        return self.read  # drafting attends to these same rows: kept, not read twice


def _padded_tokens(tokens: Tensor, width: int) -> Tensor:
    """long [width]: `tokens` then zeros (padding columns of a row with fewer new positions)."""
    return tokens.long() if len(tokens) == width else torch.cat([tokens.long(), tokens.new_zeros(width - len(tokens))])


@dataclass(frozen=True)
class _Root:
    """Where drafting starts, per row: the root's h and head position, and the keys/values
    of the row's committed positions every drafted node may see."""

    hidden: Tensor  # [B, 1, H]
    position: Tensor  # long [B, 1]
    kv: _DraftKV  # prefix [B, Hkv, R, D]; drafted levels append to it
    # bool [B, R]: the row's committed positions (rows differ in length); None when every
    # row sees all R (one row, or rows of one length)
    prefix_visible: Tensor | None
    prefix: int  # R

    def visible(self) -> Tensor:
        """bool [B, R], ``prefix_visible`` spelled out."""
        if self.prefix_visible is not None:
            return self.prefix_visible
        return torch.ones(self.hidden.shape[0], self.prefix, dtype=torch.bool, device=self.hidden.device)


class _DraftSequence:
    """The drafted nodes of one tree proposal, level by level: each level runs over its new
    nodes only, attending to the rows' committed positions and to its ancestors."""

    def __init__(self, head: EagleHead, root: _Root, capacity: int):
        b = root.hidden.shape[0]
        device = root.hidden.device
        self.head, self.root, self.length = head, root, 0
        self.visible = torch.zeros(b, capacity, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(b, capacity, dtype=torch.long, device=device)
        self.hidden = root.hidden.new_zeros(b, capacity, root.hidden.shape[-1])

    def append(self, parents: Tensor, tokens: Tensor) -> Tensor:
        """Add one node per (row, column) under nodes parents [B, k] (-1 = the root); returns
        the new nodes' h [B, k, H]. A node sees the committed positions, its ancestors, itself."""
        b, k = parents.shape
        start, under_root = self.length, (parents < 0)[..., None]
        new = slice(start, start + k)
        index = parents.clamp(min=0)[..., None]
        parent_h = self.hidden.gather(1, index.expand(-1, -1, self.hidden.shape[-1]))
        parent_h = torch.where(under_root, self.root.hidden, parent_h)
        seen = self.visible.gather(1, index.expand(-1, -1, self.visible.shape[-1])) & ~under_root
        seen.scatter_(2, index, ~under_root)
        seen[:, :, new] = torch.eye(k, dtype=torch.bool, device=seen.device)
        self.visible[:, new] = seen
        positions = torch.where(parents < 0, self.root.position, self.positions.gather(1, index[..., 0])) + 1
        self.positions[:, new] = positions
        self.length += k
        prefix = self.root.visible()[:, None, None, :].expand(b, 1, k, -1)
        mask = torch.cat([prefix, seen[:, None, :, : self.length]], dim=-1)
        hidden = self.head(parent_h, tokens, positions, mask, self.root.kv)
        self.hidden[:, new] = hidden
        return hidden


class EagleDrafter(Drafter):
    """Top-t trees from an ``EagleHead`` over the target's features (deterministic drafts,
    so ``draft_probs`` is None and the deterministic acceptance rule is exact).

    Keeps the head's keys/values of each row's committed positions between proposals
    (``_HeadCache``), so a row's drafts see its whole context; ``feature_window`` only
    bounds how far back a row's first proposal can start (RowBook keeps that many features).
    """

    needs_features = True

    def __init__(self, target: CausalLM, head: EagleHead | None = None, feature_window: int = 16) -> None:
        if feature_window < 1:
            raise ValueError(f"EagleDrafter needs feature_window >= 1, got {feature_window}")
        self.head = head if head is not None else EagleHead.for_target(target)
        self.capture_layers = self.head.capture_layers  # SpeculativeEngine wires these into the target
        self.feature_window = feature_window  # RowBook keeps this many features per row
        self.version = 0
        parameter = next(self.head.parameters())
        attention = self.head.layer.self_attn
        self.cache = _HeadCache(attention.num_kv_heads, attention.head_dim, parameter.dtype, parameter.device)

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None:
        """Distilled head weights (the head's own state_dict; the target's parts are shared)."""
        self.head.load_state_dict(state_dict)
        self.cache.clear()
        self.version = version

    def reset_row(self, row_id: int) -> None:
        self.cache.forget(row_id)

    def release_row(self, row_id: int) -> None:
        self.cache.forget(row_id)

    def propose(self, request: DraftRequest) -> DraftProposal:
        if request.features is None:
            raise ValueError(
                "EagleDrafter needs target features: run the target with capture_layers=drafter.capture_layers"
            )
        shape = request.shape
        with torch.no_grad():
            root = self._catch_up(request)
            if shape.is_chain:
                return DraftProposal(self._chain(root, min(shape.steps, shape.num_draft)))
            sequence = _DraftSequence(self.head, root, (shape.steps - 1) * shape.branch)
            node_of_pool = torch.full((request.batch_size, shape.max_nodes), -1, dtype=torch.long,
                                      device=root.hidden.device)

            def next_probs(builder: TopNTreeBuilder) -> Tensor:
                return self._expand(sequence, builder, node_of_pool)

            tree = build_topn_tree(self._probs(root.hidden[:, 0]), next_probs, shape.steps, shape.branch,
                                   shape.num_draft)
        return DraftProposal(pad_tree(tree, shape.num_draft))

    def _catch_up(self, request: DraftRequest) -> _Root:
        """Run the head over each row's committed positions it has not seen yet (at least
        the root's), store their keys/values, and return where drafting starts.

        Head position i reads (feature of token i, token i + 1), so a history of L tokens
        has positions 0..L-2 and the last one, whose token is the root, gives the root's h.
        The indices are plain integers worked out on the host and sent as one tensor each:
        at batch 1 a proposal costs about what its number of tensor ops does.
        """
        features = request.features[:, -self.feature_window:].to(next(self.head.parameters()).dtype)
        width, device = features.shape[1], features.device
        starts = [self._first_new(row_id, history, width) for row_id, history in
                  zip(request.rows, request.histories, strict=True)]
        slots = [self.cache.slot_of[row_id] for row_id in request.rows]
        counts = [len(history) - 1 - start for history, start in zip(request.histories, starts, strict=True)]
        lengths = [self.cache.lengths[slot] for slot in slots]
        new = max(counts)
        ends = [length + count for length, count in zip(lengths, counts, strict=True)]
        self.cache.reserve(max(lengths) + new)
        rows = list(zip(request.histories, starts, counts, lengths, strict=True))
        # Per row and new column c < count: the token after head position start + c, the
        # feature (the newest `count` entries of the left-padded window), the position,
        # and the store column; columns past a row's count are padding.
        tokens = torch.stack([_padded_tokens(history[start + 1: start + 1 + count], new)
                              for history, start, count, _ in rows]).to(device)
        table = torch.tensor([[(width - count + min(c, count - 1), start + c, length + c if c < count else -1)
                               for c in range(new)] for _, start, count, length in rows], device=device)
        picked, positions, write_at = table.unbind(-1)
        write_at = write_at.masked_fill(write_at < 0, self.cache.capacity)
        inputs = self.head.fuse(features.gather(1, picked[..., None].expand(-1, -1, features.shape[-1])))
        read_length = max(ends)
        keys = torch.arange(read_length, device=device)
        mask = keys <= (write_at.clamp(max=read_length))[..., None]  # [B, new, R]: the prefix, causal
        store = _StoreNew(self.cache, slots, write_at, read_length)
        hidden = self.head(inputs, tokens, positions, mask[:, None], store)
        for slot, count in zip(slots, counts, strict=True):
            self.cache.lengths[slot] += count
        last = torch.tensor(counts, device=device)[:, None] - 1
        root_hidden = hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[-1]))
        all_visible = min(ends) == read_length  # every row sees every key read: no mask needed
        visible = None if all_visible else keys[None, :] < torch.tensor(ends, device=device)[:, None]
        return _Root(root_hidden, positions.gather(1, last), _DraftKV(*store.read), visible, read_length)

    def _first_new(self, row_id: int, history: Tensor, width: int) -> int:
        """The first head position to run for this row (allocating its slot): right after
        the cached ones, but never past the root's, nor before the window's oldest feature."""
        slot = self.cache.slot(row_id)
        root = len(history) - 2
        available = min(width, len(history) - 1)
        cached_end = self.cache.starts[slot] + self.cache.lengths[slot]
        # Row ids are stable per sequence, but a drafter may outlive an engine that reused
        # them without release_row: a different prompt start means a different sequence.
        known = self.cache.openings.get(slot)
        stale = known is None or tuple(history[: len(known)].tolist()) != known
        self.cache.openings[slot] = tuple(history[:_OPENING].tolist())
        if stale or cached_end < root + 1 - available or self.cache.starts[slot] > root:
            self.cache.starts[slot], self.cache.lengths[slot] = root + 1 - available, 0  # a gap: start over
        first = min(self.cache.starts[slot] + self.cache.lengths[slot], root)  # a repeated proposal redoes the root
        self.cache.lengths[slot] = first - self.cache.starts[slot]
        return first

    def _chain(self, root: _Root, length: int) -> DraftTree:
        """The head's argmax, `length` times: what top-1 trees are, without their bookkeeping.
        Each node sees the row's committed positions and every earlier node, so when every
        row sees all it reads (batch 1) the passes need no mask at all."""
        b, prefix = root.hidden.shape[0], root.prefix
        seen = None
        if root.prefix_visible is not None:
            seen = torch.ones(b, 1, 1, prefix + length, dtype=torch.bool, device=root.hidden.device)
            seen[:, 0, 0, :prefix] = root.prefix_visible
        hidden, position = root.hidden, root.position
        token = self._argmax(hidden)
        drafted = [token]
        for level in range(1, length):
            position = position + 1
            mask = None if seen is None else seen[..., : prefix + level]
            hidden = self.head(hidden, token, position, mask, root.kv)
            token = self._argmax(hidden)
            drafted.append(token)
        tokens = torch.cat(drafted, dim=1)
        parents = torch.arange(-1, length - 1, device=tokens.device).expand(b, length)
        count = torch.full((b,), length, dtype=torch.long, device=tokens.device)
        return DraftTree(tokens, parents, count).marked_chain()

    def _expand(self, sequence: _DraftSequence, builder: TopNTreeBuilder, node_of_pool: Tensor) -> Tensor:
        """q [B, t, V] at the builder's frontier, after adding the frontier to the sequence.
        node_of_pool [B, pool]: the sequence node of every pool entry run so far (-1: none)."""
        frontier = builder.frontier
        pool_parents = builder.frontier_parents()
        parents = torch.where(pool_parents < 0, -1, node_of_pool.gather(1, pool_parents.clamp(min=0)))
        first_new = sequence.length
        hidden = sequence.append(parents, builder.frontier_tokens())
        node_of_pool.scatter_(1, frontier, first_new + torch.arange(frontier.shape[1], device=frontier.device)
                              .expand_as(frontier))
        return self._probs(hidden)

    def _probs(self, hidden: Tensor) -> Tensor:
        return torch.softmax(self.head.logits(hidden).float(), dim=-1)

    def _argmax(self, hidden: Tensor) -> Tensor:
        return self.head.argmax_tokens(hidden)  # a head in another layout maps its own vocabulary


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
