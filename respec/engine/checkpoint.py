"""Load and save Hugging Face checkpoint directories: ``config.json`` plus safetensors.

Layouts: one ``model.safetensors``, or shards ``model-00001-of-00003.safetensors`` ...
named by ``model.safetensors.index.json`` (its ``weight_map``: tensor -> shard). A path is
always a local directory; nothing is ever downloaded.

Every tensor is checked against the model the config describes before anything is
loaded: a missing file, a missing or unexpected tensor, or a shape mismatch raises
``CheckpointError`` naming the file and the tensor. With tied embeddings ``lm_head.weight``
may be absent (it is the embedding matrix) and is not written twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from respec.engine.config import ModelConfig
from respec.engine.errors import CheckpointError
from respec.engine.model import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Old Llama checkpoints store RoPE tables; this model computes them from the config.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")
_LAYER_PREFIX = "model.layers."


def load_model(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    decoder_layers: bool = True,
) -> CausalLM:
    """The model in `directory`, in `dtype` on `device`, in eval mode. Without
    `decoder_layers`, only the embedding, final norm and lm_head are read (every tensor is
    still checked); the layers stay on the meta device, taking no memory: all an EAGLE
    head's trainer needs of a policy that is 28 GB at 7B."""
    directory = _existing_directory(directory)
    config = ModelConfig.from_file(directory / "config.json")
    with torch.device("meta"):  # no memory, no random init: the checkpoint fills everything
        model = CausalLM(config)
    wanted = None if decoder_layers else (lambda name: not name.startswith(_LAYER_PREFIX))
    tensors = read_tensors(directory, model, dtype, device, wanted)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # assign replaced the embedding; point lm_head at the new one
    return model.eval()


def load_weights(model: CausalLM, directory: str | Path) -> None:
    """Copy a checkpoint's tensors into an existing model (a new policy version, say)."""
    directory = _existing_directory(directory)
    parameter = next(model.parameters())
    tensors = read_tensors(directory, model, parameter.dtype, parameter.device)
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            if name in tensors:
                value.copy_(tensors[name])


def read_tensors(
    directory: Path,
    model: CausalLM,
    dtype: torch.dtype,
    device: str | torch.device,
    wanted: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Every tensor `model` needs from the checkpoint (those whose names `wanted` accepts,
    if given), checked, in `dtype` on `device`."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    read = {name for name in expected if wanted is None or wanted(name)}
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    tensors: dict[str, Tensor] = {}
    files = _files_and_names(directory)
    for path, names in files.items():
        tensors.update(_read_file(path, names, expected, read, dtype, device))
    missing = sorted(read - set(tensors) - optional)
    if missing:
        source = directory / (SINGLE_FILE if None in files.values() else INDEX_FILE)
        more = f", {len(missing)} in all" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing{more}")
    return tensors


def save_model(model: CausalLM, directory: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and the weights (sharded above `max_shard_bytes`); returns the
    directory. Weight files of an earlier save there are removed first, so a stale index
    can never shadow the new weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(old.name):
            old.unlink()
    state = weights_to_save(model)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _split(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return directory
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------- helpers


def _existing_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    return directory


def _files_and_names(directory: Path) -> dict[Path, set[str] | None]:
    """Weight files -> the tensor names the index assigns them (None: whatever is inside)."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: no readable 'weight_map' ({error!r})") from None
        files: dict[Path, set[str] | None] = {}
        for name, shard in weight_map.items():
            files.setdefault(directory / shard, set()).add(name)
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in {INDEX_FILE} not found")
        return files
    if (directory / SINGLE_FILE).is_file():
        return {directory / SINGLE_FILE: None}
    raise CheckpointError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
    )


def _read_file(
    path: Path,
    names: set[str] | None,
    expected: dict[str, tuple[int, ...]],
    read: set[str],
    dtype: torch.dtype,
    device: str | torch.device,
) -> dict[str, Tensor]:
    """Check every tensor's name and shape in one file, then read those named in `read`."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as file:
            present = set(file.keys())
            for name in sorted(present):
                _check_tensor(path, name, tuple(file.get_slice(name).get_shape()), expected)
            if names is not None and names - present:
                absent = sorted(names - present)[0]
                raise CheckpointError(f"{path}: tensor {absent!r} listed in {INDEX_FILE} is not in the file")
            return {
                name: file.get_tensor(name).to(dtype) for name in sorted(present) if name in read
            }
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _check_tensor(path: Path, name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]]) -> None:
    if name not in expected:
        if _IGNORED.fullmatch(name):
            return
        raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of the model config.json describes)")
    if shape != expected[name]:
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {shape} but config.json implies {expected[name]}"
        )


def weights_to_save(model: CausalLM) -> dict[str, Tensor]:
    """CPU copies of the weights under their Hugging Face names, tied ones once (safetensors
    refuses tensors that share memory)."""
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as the embeddings; stored once
    return state


def _split(state: dict[str, Tensor], max_shard_bytes: int | None) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors, each under max_shard_bytes unless one tensor alone is larger."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
