"""The model's shape and numerics, read from a Hugging Face ``config.json``.

Supported: ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) and ``LlamaForCausalLM`` (Llama 2/3,
3.1, 3.2). Both the transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the
5.x one (``rope_parameters``) are read; ``to_hf_dict`` writes the 4.x layout, which every
transformers version >= 4.45 loads. Keys a family defines a default for (e.g.
``num_key_value_heads``) take that default when absent; the shape keys are required.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from respec.engine.errors import CheckpointError

FAMILIES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# transformers' own defaults per family, used when config.json leaves a key out.
FAMILY_DEFAULTS = {
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
}
ROPE_SCALING_KINDS = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched for long context.

    linear: every inverse frequency divided by ``factor`` (position interpolation).
    llama3: low frequencies divided by ``factor``, high ones kept, a smooth blend between,
    with the band edges set by ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``.
    """

    kind: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def to_hf_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"rope_type": self.kind, "factor": self.factor}
        if self.kind == "llama3":
            raw["low_freq_factor"] = self.low_freq_factor
            raw["high_freq_factor"] = self.high_freq_factor
            raw["original_max_position_embeddings"] = self.original_max_position_embeddings
        return raw


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to be built and to load a checkpoint's tensors."""

    architecture: str  # "Qwen2ForCausalLM" or "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # biases on q/k/v (always on in Qwen2)
    output_bias: bool = False  # bias on o_proj (Llama's attention_bias also sets it)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in FAMILIES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {list(FAMILIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.family == "qwen2" and (
            not self.attention_bias or self.output_bias or self.mlp_bias
        ):
            raise ValueError("Qwen2 has q/k/v biases and no o_proj/MLP biases")

    @property
    def family(self) -> str:
        """"qwen2" or "llama": the transformers model_type."""
        return FAMILIES[self.architecture]

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (Llama 3.1 lists several; see eos_token_ids)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a config.json; a directory means its config.json."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed config.json; errors name `source` and the key at fault."""
        architecture = _architecture(raw, source)
        family = FAMILIES[architecture]
        read = _Reader(raw, source, FAMILY_DEFAULTS[family])
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu)")
        if raw.get("use_sliding_window"):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
        heads = read.integer("num_attention_heads")
        hidden = read.integer("hidden_size")
        theta, scaling = _rope(raw, source, read.number("rope_theta"))
        llama_bias = bool(raw.get("attention_bias", False))
        try:
            return cls(
                architecture=architecture,
                vocab_size=read.integer("vocab_size"),
                hidden_size=hidden,
                intermediate_size=read.integer("intermediate_size"),
                num_hidden_layers=read.integer("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=read.integer("num_key_value_heads", default=heads),
                head_dim=read.integer("head_dim", default=hidden // heads),
                rms_norm_eps=read.number("rms_norm_eps"),
                rope_theta=theta,
                rope_scaling=scaling,
                attention_bias=family == "qwen2" or llama_bias,
                output_bias=family == "llama" and llama_bias,
                mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                max_position_embeddings=read.integer("max_position_embeddings"),
                bos_token_id=read.optional_int("bos_token_id"),
                eos_token_ids=read.int_tuple("eos_token_id"),
                pad_token_id=read.optional_int("pad_token_id"),
            )
        except ValueError as error:
            raise CheckpointError(f"{source}: {error}") from None

    # ------------------------------------------------------------------ writing

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers and ``from_dict`` both read back as this config."""
        eos = list(self.eos_token_ids)
        raw: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "llama":
            raw["attention_bias"] = self.attention_bias
            raw["mlp_bias"] = self.mlp_bias
        else:
            raw["use_sliding_window"] = False
        return raw

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/config.json``; returns its path."""
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path


# ---------------------------------------------------------------------- helpers


def _architecture(raw: dict[str, Any], source: str) -> str:
    architectures = raw.get("architectures")
    if not architectures:  # a bare config saved without a model: go by model_type
        by_type = {family: name for name, family in FAMILIES.items()}
        if raw.get("model_type") in by_type:
            return by_type[raw["model_type"]]
        raise CheckpointError(f"{source}: missing key 'architectures' (e.g. ['Qwen2ForCausalLM'])")
    name = architectures[0] if isinstance(architectures, list) else architectures
    if name not in FAMILIES:
        raise CheckpointError(
            f"{source}: architecture {name!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    return name


def _rope(raw: dict[str, Any], source: str, default_theta: float) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either rope_theta + rope_scaling (4.x) or rope_parameters (5.x)."""
    parameters = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or parameters
    theta = raw.get("rope_theta", parameters.get("rope_theta", default_theta))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING_KINDS:
        raise CheckpointError(
            f"{source}: rope scaling type {kind!r} is not supported "
            f"(supported: none, {', '.join(map(repr, ROPE_SCALING_KINDS))})"
        )
    read = _Reader(scaling, f"{source}: rope_scaling", {})
    if kind == "linear":
        return float(theta), RopeScaling("linear", read.number("factor"))
    return float(theta), RopeScaling(
        "llama3",
        read.number("factor"),
        read.number("low_freq_factor"),
        read.number("high_freq_factor"),
        read.integer("original_max_position_embeddings"),
    )


class _Reader:
    """Typed access to a JSON object; errors name the source and the key."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any], source: str, defaults: dict[str, Any]):
        self.raw, self.source, self.defaults = raw, source, defaults

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None:
            value = self.defaults.get(key, default)
        if value is self._MISSING:
            raise CheckpointError(f"{self.source}: missing key {key!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int = 1) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"{self.source}: key {key!r} must be an int >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CheckpointError(f"{self.source}: key {key!r} must be a number, got {value!r}")
        return float(value)

    def optional_int(self, key: str) -> int | None:
        return None if self.raw.get(key) is None else self.integer(key, minimum=0)

    def int_tuple(self, key: str) -> tuple[int, ...]:
        value = self.raw.get(key)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{self.source}: key {key!r} must be an int or a list of ints")
        return tuple(values)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (a checkpoint's config); CheckpointError naming the file
    when it is not valid JSON or not an object."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw
