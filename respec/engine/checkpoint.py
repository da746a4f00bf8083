"""Loading and saving Hugging Face checkpoint directories (config.json + safetensors).

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json` naming the
shards) layouts. Nothing is ever downloaded: a path is a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from respec.engine.config import ModelConfig
from respec.engine.errors import CheckpointError
from respec.engine.model import CausalLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CausalLM:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config = ModelConfig.load(directory)
    tensors = _read_tensors(directory)
    model = CausalLM(config)
    _check_tensors(model, tensors, directory)
    model.load_state_dict(tensors, strict=False)
    return model.to(dtype=dtype, device=device).eval()


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / INDEX).is_file():
        index = json.loads((directory / INDEX).read_text())
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            path = directory / shard
            if not path.is_file():
                raise CheckpointError(f"{directory}: shard {shard} named in {INDEX} is missing")
            tensors.update(load_file(path))
        return tensors
    if (directory / SINGLE).is_file():
        return load_file(directory / SINGLE)
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")


def _check_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    for name, parameter in expected.items():
        if name not in tensors:
            if tied and name == "lm_head.weight":
                continue
            raise CheckpointError(f"{directory}: tensor {name!r} is missing")
        if tensors[name].shape != parameter.shape:
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"the config implies {tuple(parameter.shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensors {unexpected[:5]}")


def save_model(model: CausalLM, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embeddings
    save_file(state, directory / SINGLE, metadata={"format": "pt"})
    return directory
