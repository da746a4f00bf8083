"""Measure step cost on this machine: plain decoding and drafting + verification per draft
shape, over a grid of batch sizes and context lengths, with the real engine.

One grid point: B rows whose prompts are L tokens long are prefilled into a
`SpeculativeEngine`, a few warm-up steps run, then `repeats` timed steps; the point's
step time is their median (a step drafts, verifies and appends, as the Generator does).
The configs of one grid point take turns step by step, so load from another process
that lasts longer than a step slows them alike; the median drops the steps that a
shorter burst stalled (2-4x spikes are common on the shared CPU; a mean over 8 steps
turned plain decoding's 2.0 ms at batch 1 into 3.4 ms and the Scheduler's choice with it).
Prompt contents are random tokens: cost depends on shapes, not on what is said. The
acceptance each shape reaches is measured separately, on the task prompts of the
model's directory when it has a tokenizer (the prior the Scheduler starts from).

A profile is a JSON file keyed by device and model: the device name, torch version and
thread count, and a hash of the model's config.json (cost depends on the architecture,
not on the weights, so a policy that moves during RL keeps its profile).
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from respec.engine.drafters.base import Drafter, DraftShape
from respec.engine.speculative import Sampling, SpeculativeEngine

FORMAT = "respec-profile/1"
NOSD = "nosd"
DEFAULT_CONFIGS = ("s1_t1_n1", "s2_t1_n2", "s4_t1_n4", "s6_t1_n6", "s3_t2_n6")
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_CONTEXTS = (16, 64, 144)


@dataclass(frozen=True)
class ProfilePoint:
    config: str  # "nosd" or "s{s}_t{t}_n{n}"
    batch: int
    context: int  # tokens in each row's context when the timed steps start
    step_s: float  # median over the timed steps
    samples_s: tuple[float, ...] = ()  # every timed step, for judging noise


@dataclass
class Profile:
    key: dict  # device, torch, threads, model_path, model_config_hash, drafter, draft_path
    points: list[ProfilePoint]
    accept_len: dict[str, float] = field(default_factory=dict)  # config -> tokens per step measured
    created: str = ""
    wall_s: float = 0.0

    @property
    def configs(self) -> list[str]:
        return sorted({point.config for point in self.points})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, **asdict(self)}
        path.write_text(json.dumps(body, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such profile (make one with `respec profile CONFIG --out {path}`)")
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT:
            raise ValueError(f"{path}: not a respec profile (format {body.get('format')!r}, expected {FORMAT!r})")
        points = [ProfilePoint(**{**p, "samples_s": tuple(p.get("samples_s", ()))}) for p in body["points"]]
        return cls(body["key"], points, body.get("accept_len", {}), body.get("created", ""), body.get("wall_s", 0.0))

    def matches(self, other_key: dict) -> list[str]:
        """The key fields that differ from `other_key` (a foreign profile still works: the
        online refresh corrects it, but the caller should say so)."""
        fields = ("device", "model_config_hash")
        return [f"{name}: {self.key.get(name)!r} != {other_key.get(name)!r}" for name in fields
                if self.key.get(name) != other_key.get(name)]


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    return "cpu: " + (platform.processor() or platform.machine())


def profile_key(model_dir: str | Path, drafter: str, draft_path: str | None, device: str) -> dict:
    config = Path(model_dir) / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else ""
    return {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model_path": str(model_dir), "model_config_hash": digest, "drafter": drafter,
            "draft_path": draft_path or ""}


def time_points(model, drafter: Drafter | None, shapes: list[DraftShape | None], batch: int, context: int,
                warmup: int = 2, repeats: int = 5, seed: int = 0) -> list[ProfilePoint]:
    """Median step time of `batch` rows at `context` tokens for each shape (None: plain).

    The shapes take turns step by step (one engine each): a burst of load from another
    process then slows all of them alike, and their ratios, which decide, stay right."""
    generator = torch.Generator().manual_seed(seed + batch * 1000 + context)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (context,), generator=generator) for _ in range(batch)]
    engines = [_engine(model, drafter, shape, prompts, warmup + repeats) for shape in shapes]
    samples: list[list[float]] = [[] for _ in shapes]
    for index in range(warmup + repeats):
        for shape, engine, times in zip(shapes, engines, samples, strict=True):
            started = time.perf_counter()
            engine.step(shape)
            if index >= warmup:
                times.append(time.perf_counter() - started)
    return [ProfilePoint(shape.name if shape else NOSD, batch, context, statistics.median(times),
                         tuple(round(t, 6) for t in times)) for shape, times in zip(shapes, samples, strict=True)]


def _engine(model, drafter, shape: DraftShape | None, prompts: list[torch.Tensor], steps: int) -> SpeculativeEngine:
    """An engine with the prompts prefilled and room for `steps` steps of this shape."""
    per_step = shape.num_draft + 1 if shape else 1
    budget = (steps + 1) * per_step + 1
    engine = SpeculativeEngine(model, drafter if shape else None, max_rows=len(prompts),
                               max_len=len(prompts[0]) + budget + per_step + 1)
    engine.add(prompts, Sampling(temperature=0.0, max_new_tokens=budget), reserve=per_step)
    return engine


def measure_accept_len(model, drafter: Drafter, shape: DraftShape, prompts: list[torch.Tensor],
                       stop: tuple[int, ...], max_new_tokens: int = 48) -> float:
    """Mean tokens per verification step of greedy SD with this shape on these prompts."""
    engine = SpeculativeEngine(model, drafter, max_rows=len(prompts),
                               max_len=max(len(p) for p in prompts) + max_new_tokens + shape.num_draft + 2)
    rows = engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop), shape)
    tokens, steps = sum(len(r.tokens) - 1 for r in rows), sum(r.steps for r in rows)
    return tokens / max(steps, 1)


def profile(model, drafter: Drafter | None, key: dict, configs=DEFAULT_CONFIGS, batches=DEFAULT_BATCHES,
            contexts=DEFAULT_CONTEXTS, accept_prompts: tuple[list[torch.Tensor], tuple[int, ...]] | None = None,
            repeats: int = 8, warmup: int = 2, advance: Callable[[str, int], None] | None = None,
            passes: int = 2) -> Profile:
    """Time plain decoding and every config over the grid, `passes` times, keeping each
    point's fastest pass (load from other processes only ever adds time; a grid point
    measured during a long burst came out 4x slow in one pass); `advance(label, points)`."""
    shapes = [None] + ([DraftShape.parse(c) for c in configs] if drafter is not None else [])
    started = time.perf_counter()
    time_points(model, drafter, shapes, batches[0], contexts[0], warmup, 2)  # first calls allocate: untimed
    best: dict[tuple, ProfilePoint] = {}
    for index in range(passes):
        for context in contexts:
            for batch in batches:
                for point in time_points(model, drafter, shapes, batch, context, warmup, repeats, seed=index):
                    where = (point.config, batch, context)
                    if where not in best or point.step_s < best[where].step_s:
                        best[where] = point
                if advance:
                    advance(f"pass {index + 1}/{passes} B={batch} L={context}", len(shapes))
    points = list(best.values())
    accept = {}
    if drafter is not None and accept_prompts is not None:
        for shape in shapes[1:]:
            accept[shape.name] = round(measure_accept_len(model, drafter, shape, *accept_prompts), 4)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    return Profile(key, points, accept, created, round(time.perf_counter() - started, 2))


def grid_size(configs, batches, contexts, with_drafter: bool, passes: int = 2) -> int:
    return passes * len(batches) * len(contexts) * (1 + (len(configs) if with_drafter else 0))
