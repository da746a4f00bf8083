"""Model configuration read from a Hugging Face `config.json` (Qwen2 / Llama families)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from respec.engine.errors import CheckpointError

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "Qwen2ForCausalLM" or "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def family(self) -> str:
        return SUPPORTED[self.architecture]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        architecture = (raw.get("architectures") or [None])[0]
        if architecture not in SUPPORTED:
            raise CheckpointError(
                f"{source}: architecture {architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED)})"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise CheckpointError(f"{source}: missing key {key!r}")
        heads = raw["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_scaling`
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default", "linear", "llama3"):
            raise CheckpointError(f"{source}: rope_scaling {scaling!r} is not supported (linear, llama3)")
        return cls(
            architecture=architecture, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=scaling or None,
            attention_bias=raw.get("attention_bias", architecture == "Qwen2ForCausalLM"),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: not valid JSON: {error}") from None
        return cls.from_dict(raw, str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["architectures"] = [raw.pop("architecture")]
        raw["model_type"] = self.family
        if self.family == "qwen2":
            raw.pop("attention_bias")  # Qwen2 always has q/k/v biases
        return raw
