"""What `respec serve` starts from: its options, checked before Ray starts, and the service
a replica builds from them (model, tokenizer, drafter, engine, shape rule)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from respec.engine.checkpoint import load_model
from respec.engine.config import ModelConfig
from respec.engine.drafters.eagle import EagleDrafter, EagleHead
from respec.engine.speculative import SpeculativeEngine
from respec.engine.tokenizer import check_tokenizer_matches, load_tokenizer
from respec.serve.engine_loop import ServingEngine
from respec.serve.service import CompletionService, has_chat_template
from respec.serve.shape import make_chooser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_LEN = 2048  # cache positions per row when the model allows more (memory: rows x max_len)


@dataclass(frozen=True)
class ServeOptions:
    model_dir: str
    draft_dir: str = ""  # an EAGLE head directory (respec's or the public EAGLE-3 layout); "" = no SD
    shape: str = "auto"  # "auto" (the Scheduler's rule), "nosd", or a fixed shape such as s4_t1_n4
    profile: str = ""  # auto: a `respec profile` JSON to start from ("" = the built-in prior)
    max_rows: int = 16  # rows decoded together (KV slots); more requests wait for a free one
    max_len: int = 0  # cache positions per row: prompt + completion + draft room (0: the model's, at most 2048)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1  # torch threads in the replica (0: torch's default)
    seed: int = 0  # the sampler's seed (the replica's, not per request)
    model_name: str = ""  # the name responses carry ("" = MODEL_DIR's directory name)
    feature_window: int = 16  # EAGLE: target features kept per row
    num_cpus: float = 1.0  # the replica's Ray resources
    num_gpus: float = 0.0

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name

    def cache_len(self, config: ModelConfig) -> int:
        return self.max_len or min(config.max_position_embeddings, DEFAULT_MAX_LEN)


def check_options(options: ServeOptions) -> None:
    """ValueError/OSError naming what is wrong, before anything starts."""
    config = ModelConfig.from_file(Path(options.model_dir) / "config.json")
    check_tokenizer_matches(load_tokenizer(options.model_dir), config)
    if options.draft_dir and not Path(options.draft_dir).is_dir():
        raise ValueError(f"--draft {options.draft_dir}: not a directory")
    make_chooser(options.shape, bool(options.draft_dir), options.profile or None)
    if options.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.max_rows < 1 or options.max_len < 0 or options.threads < 0:
        raise ValueError("--max-rows must be >= 1, --max-len >= 0 (0: the model's), --threads >= 0")
    if options.device.startswith("cuda") and options.num_gpus <= 0:
        raise ValueError("--device cuda needs --num-gpus > 0: Ray hides GPUs from a replica that asks for none")
    if options.max_len > config.max_position_embeddings:
        raise ValueError(f"--max-len {options.max_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")


def build_service(options: ServeOptions) -> CompletionService:
    if options.threads:
        torch.set_num_threads(options.threads)
    model = load_model(options.model_dir, DTYPES[options.dtype], options.device)
    tokenizer = load_tokenizer(options.model_dir)
    check_tokenizer_matches(tokenizer, model.config)
    drafter = None
    if options.draft_dir:
        head = EagleHead.load(options.draft_dir, model).eval()
        drafter = EagleDrafter(model, head, options.feature_window)
    chooser = make_chooser(options.shape, drafter is not None, options.profile or None)
    engine = SpeculativeEngine(model, drafter, options.max_rows, options.cache_len(model.config), options.seed)
    stop_ids = tuple(dict.fromkeys([*model.config.eos_token_ids,
                                    *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])]))
    template = options.model_dir if has_chat_template(options.model_dir) else None
    return CompletionService(ServingEngine(engine, chooser), tokenizer, options.name, stop_ids,
                             model.config.vocab_size, drafter is not None, template)
