"""Read and write EAGLE-3 draft heads in the public checkpoint layout.

The layout (what SafeAILab/EAGLE's ``traineagle3`` and sgl-project/SpecForge save, and what
SGLang and vLLM serve): a directory with

- ``config.json``: a Llama config of the head itself (``architectures:
  ["LlamaForCausalLMEagle3"]``, ``num_hidden_layers: 1``, ``hidden_size``, heads, ``rope_*``,
  ``rms_norm_eps``), the target's ``vocab_size``, and ``draft_vocab_size``; optionally
  ``target_hidden_size`` and ``eagle_aux_hidden_state_layer_ids`` (top level or inside
  ``eagle_config``);
- ``model.safetensors`` (SpecForge) or ``pytorch_model.bin`` (EAGLE) with ``fc.weight``
  [H, 3H], ``midlayer.{self_attn.{q,k,v}_proj (2H wide), o_proj, mlp.{gate,up,down}_proj,
  hidden_norm, input_layernorm, post_attention_layernorm}.weight``, ``norm.weight``,
  ``lm_head.weight`` [draft_vocab, H], ``d2t`` (int64: target id = draft id + d2t[draft id]),
  ``t2d`` (bool [vocab]: in the draft vocabulary), and sometimes ``embed_tokens.weight``
  (a frozen copy of the target's embeddings; respec reads the target's own instead).

Feature layers: EAGLE and vLLM name a layer by the hidden state *entering* it (id 0 = the
embeddings), defaulting to (2, L // 2, L - 3) for an L-layer target; respec captures the
*output* of layer id - 1, which is the same tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from respec.engine.config import ModelConfig, read_json_object
from respec.engine.drafters.eagle import TargetParts
from respec.engine.errors import CheckpointError
from respec.engine.model import CausalLM
from respec.interop.eagle3_head import Eagle3Head, Eagle3Spec

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCHITECTURE = "LlamaForCausalLMEagle3"
# Tensors the layout may carry that the head does not keep (see the module docstring).
_READ_ONLY = ("t2d", "embed_tokens.weight")


def is_eagle3_checkpoint(directory: str | Path) -> bool:
    """A directory in this layout: a config.json naming an EAGLE-3 head."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and ("draft_vocab_size" in raw or ARCHITECTURE in (raw.get("architectures") or []))


def load_eagle3_head(directory: str | Path, target: CausalLM) -> Eagle3Head:
    """The head in `directory`, attached to `target`, typed and placed like it."""
    directory = Path(directory)
    raw = _read_config(directory / CONFIG)
    spec = read_spec(raw, target.config, str(directory / CONFIG))
    parameter = next(target.parameters())
    head = Eagle3Head(target.config, TargetParts.of(target), spec).to(device=parameter.device, dtype=parameter.dtype)
    tensors = _read_weights(directory)
    _check_vocab_maps(tensors, spec, target.config.vocab_size, directory)
    if "embed_tokens.weight" in tensors:
        _check_shape(directory, "embed_tokens.weight", tensors["embed_tokens.weight"], tuple(target.embed_tokens.weight.shape))
    _load_state(head, {k: v for k, v in tensors.items() if k not in _READ_ONLY}, directory)
    return head


def read_spec(raw: dict[str, Any], target: ModelConfig, source: str) -> Eagle3Spec:
    """Check the config against what respec can run and against the target; errors name
    the file, the key and what is unsupported."""
    layers = raw.get("num_hidden_layers", 1)
    if layers != 1:
        raise CheckpointError(f"{source}: num_hidden_layers={layers}: only one-layer EAGLE-3 heads are supported")
    for key, ours in (("hidden_size", target.hidden_size), ("target_hidden_size", target.hidden_size),
                      ("vocab_size", target.vocab_size)):
        if raw.get(key, ours) != ours:
            raise CheckpointError(f"{source}: {key}={raw[key]}, but the target has {ours}: a head for another model")
    layer = ModelConfig.from_dict({**raw, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, source)
    draft_vocab = raw.get("draft_vocab_size", target.vocab_size)
    if not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= target.vocab_size:
        raise CheckpointError(f"{source}: draft_vocab_size={draft_vocab!r} must be an int in [1, {target.vocab_size}]")
    ids = _aux_layer_ids(raw, target.num_hidden_layers, source)
    return Eagle3Spec(layer, draft_vocab, tuple(i - 1 for i in ids), ids)


def _aux_layer_ids(raw: dict[str, Any], target_layers: int, source: str) -> tuple[int, int, int]:
    nested = raw.get("eagle_config") if isinstance(raw.get("eagle_config"), dict) else {}
    ids = raw.get("eagle_aux_hidden_state_layer_ids") or nested.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = [2, target_layers // 2, target_layers - 3]
    if not (isinstance(ids, list) and len(ids) == 3 and all(isinstance(i, int) for i in ids)):
        raise CheckpointError(f"{source}: eagle_aux_hidden_state_layer_ids must be 3 ints, got {ids!r}")
    if not all(1 <= i < target_layers for i in ids):
        # Id 0 is the embeddings and id L the final-normed output: neither is a layer
        # output respec's target captures.
        raise CheckpointError(
            f"{source}: feature layers {ids} (EAGLE ids: input of layer i) must be in [1, {target_layers - 1}] "
            f"for a {target_layers}-layer target"
        )
    return tuple(ids)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (an EAGLE-3 head directory has config.json and its weights)")
    return read_json_object(path)


def _read_weights(directory: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return load_file(path)
            # weights_only: a pickle that is not plain tensors is refused, never executed.
            return torch.load(path, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)})")


def _check_vocab_maps(tensors: dict[str, Tensor], spec: Eagle3Spec, vocab: int, directory: Path) -> None:
    """d2t must send the draft ids to distinct target ids, and t2d (when present) mark
    exactly those."""
    if "d2t" not in tensors:
        if spec.draft_vocab_size != vocab:
            raise CheckpointError(f"{directory}: draft_vocab_size={spec.draft_vocab_size} < {vocab} but no 'd2t' tensor")
        tensors["d2t"] = torch.zeros(vocab, dtype=torch.long)
    d2t = tensors["d2t"]
    _check_shape(directory, "d2t", d2t, (spec.draft_vocab_size,))
    ids = torch.arange(spec.draft_vocab_size) + d2t.long()
    if ids.min() < 0 or ids.max() >= vocab or ids.unique().numel() != ids.numel():
        raise CheckpointError(f"{directory}: 'd2t' maps draft ids outside [0, {vocab}) or two onto one target id")
    if "t2d" in tensors:
        t2d = tensors["t2d"]
        _check_shape(directory, "t2d", t2d, (vocab,))
        marked = torch.zeros(vocab, dtype=torch.bool)
        marked[ids] = True
        if not torch.equal(t2d.bool(), marked):
            raise CheckpointError(f"{directory}: 't2d' does not mark exactly the target ids that 'd2t' maps to")
    tensors["d2t"] = d2t.long()


def _check_shape(directory: Path, name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{directory}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")


def _load_state(head: Eagle3Head, tensors: dict[str, Tensor], directory: Path) -> None:
    expected = head.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        hint = " (fc.bias / 2H-wide fc: an EAGLE-1/2 head, not EAGLE-3)" if "fc.bias" in unexpected else ""
        raise CheckpointError(f"{directory}: unexpected tensors {unexpected[:5]}{hint}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{directory}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    for name, tensor in tensors.items():
        _check_shape(directory, name, tensor, tuple(expected[name].shape))
    with torch.no_grad():
        for name, value in head.state_dict(keep_vars=True).items():
            value.copy_(tensors[name].to(value.dtype))


# ---------------------------------------------------------------------- writing


def save_eagle3_head(head: Eagle3Head, directory: str | Path) -> Path:
    """config.json + model.safetensors in the layout above (with t2d), readable by
    ``load_eagle3_head`` and by the tools that use the layout. A head over the full
    vocabulary is written without d2t/t2d, as vLLM expects (0.32 refuses a d2t it has no
    parameter for when draft_vocab_size equals vocab_size)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    if head.full_vocabulary:
        state.pop("d2t")
    else:
        state["t2d"] = torch.zeros(head.config.vocab_size, dtype=torch.bool)
        state["t2d"][head.draft_to_target().cpu()] = True
    save_file(state, directory / WEIGHT_FILES[0])
    (directory / CONFIG).write_text(json.dumps(eagle3_config(head), indent=2) + "\n")
    return directory


def eagle3_config(head: Eagle3Head) -> dict[str, Any]:
    layer = head.spec.layer.to_hf_dict()
    return {
        **layer,
        "architectures": [ARCHITECTURE],
        "num_hidden_layers": 1,
        "vocab_size": head.config.vocab_size,
        "draft_vocab_size": head.spec.draft_vocab_size,
        "target_hidden_size": head.config.hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(head.spec.aux_layer_ids),
    }
