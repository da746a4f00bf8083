"""`respec bench sd`: decode throughput of speculative decoding against plain decoding.

For each batch size, plain decoding (the baseline, "nosd") and every draft shape of the
grid generate the same prompts with the same model in the same run; the report is
accepted (emitted) tokens per second, the mean tokens per verification step, and the
speedup over nosd at that batch size (the shape of ReSpec's Fig. 7). Greedy decoding, so
every configuration emits the same tokens and only speed differs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from respec.bench.console import table_console
from respec.engine.checkpoint import load_model
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.ngram import NgramDrafter
from respec.engine.speculative import Sampling, SpeculativeEngine

DEFAULT_SHAPES = ("s2_t1_n2", "s4_t1_n4", "s6_t1_n6", "s3_t2_n6", "s4_t2_n8")


def bench_prompts(model_dir: Path, count: int, seed: int = 0) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """(prompts, stop token ids). With a tokenizer: the built-in task posed as the RL
    rollouts pose it (BOS + prompt, stop at EOS), so the drafter sees what it drafts in
    RL and not the noise a policy emits past its EOS. Else token patterns, no stop."""
    if (model_dir / "tokenizer.json").is_file():
        import random

        from respec.engine.tokenizer import load_tokenizer
        from respec.prepare import TASK, TASK_PARAMS  # the default; prepare.json may name another
        from respec.tasks import make_task

        name, params = _prepared_task(model_dir) or (TASK, TASK_PARAMS)
        tokenizer, task, rng = load_tokenizer(model_dir), make_task(name, **params), random.Random(seed)
        prompts = [torch.tensor(tokenizer.encode(task.sample(rng).prompt, add_bos=True)) for _ in range(count)]
        return prompts, () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    generator = torch.Generator().manual_seed(seed)
    vocab = load_model(model_dir).config.vocab_size
    return [torch.randint(0, vocab, (4,), generator=generator).repeat(3) for _ in range(count)], ()


def _prepared_task(model_dir: Path) -> tuple[str, dict] | None:
    """The task `respec prepare` trained this policy on, from the prepare.json beside it
    (`respec prepare --out DIR` writes DIR/policy and DIR/prepare.json); None if it says none."""
    report = model_dir.parent / "prepare.json"
    if not report.is_file():
        return None
    task = json.loads(report.read_text()).get("task")
    return (task["name"], task.get("params") or {}) if task else None


def measure(model, drafter, prompts, shape: DraftShape | None, max_new_tokens: int,
            stop_token_ids: tuple[int, ...] = ()) -> dict:
    engine = SpeculativeEngine(model, drafter, max_rows=len(prompts), max_len=max(len(p) for p in prompts)
                               + max_new_tokens + 32)
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
    started = time.perf_counter()
    rows = engine.generate(prompts, sampling, shape)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.tokens) for r in rows)
    steps = sum(r.steps for r in rows)
    return {"tokens_per_s": tokens / seconds, "accept_len": (tokens - len(rows)) / max(steps, 1),
            "outputs": [r.tokens for r in rows]}


def run_benchmark(model_dir: str, draft: str = "ngram", batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                  shapes: tuple[str, ...] = DEFAULT_SHAPES, max_new_tokens: int = 64, device: str = "cpu",
                  plot: str | None = None, repeats: int = 1, threads: int = 0) -> dict:
    """`repeats` > 1: nosd and every shape run in turn that many times per batch size and
    each keeps its fastest run, so a burst of load on a shared machine lands on one run
    of one configuration instead of on whichever configuration happened to run then."""
    if threads:
        torch.set_num_threads(threads)
    model = load_model(Path(model_dir), device=device)
    drafter = NgramDrafter() if draft == "ngram" else _model_drafter(draft, model)
    configs = ("nosd", *shapes)
    rows = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("bench sd", total=len(batches) * len(configs) * repeats)
        for batch in batches:
            prompts, stop = bench_prompts(Path(model_dir), batch)
            best: dict[str, dict] = {}
            for _ in range(repeats):
                for name in configs:
                    shape = None if name == "nosd" else DraftShape.parse(name)
                    result = measure(model, drafter if shape else None, prompts, shape, max_new_tokens, stop)
                    if name != "nosd" and result["outputs"] != best["nosd"]["outputs"]:
                        raise AssertionError(f"greedy SD ({name}, batch {batch}) changed the output")
                    if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                        best[name] = result
                    progress.advance(task)
            rows += [_row(batch, name, best[name], best["nosd"]) for name in configs]
    results = {"model": str(model_dir), "draft": "ngram" if draft == "ngram" else "eagle", "draft_path": draft,
               "device": device, "max_new_tokens": max_new_tokens, "repeats": repeats,
               "threads": torch.get_num_threads(), "rows": rows}
    _print(results)
    if plot:
        _plot(results, plot)
    return results


def _row(batch: int, config: str, result: dict, baseline: dict) -> dict:
    return {"batch": batch, "config": config, "tokens_per_s": round(result["tokens_per_s"], 2),
            "accept_len": round(result["accept_len"], 3),
            "speedup": round(result["tokens_per_s"] / baseline["tokens_per_s"], 3)}


def _model_drafter(path: str, model):
    """--draft DIR: an EAGLE-style head saved by `respec prepare` (EagleHead.save)."""
    from respec.engine.drafters.eagle import EagleDrafter, EagleHead

    if not (Path(path) / "eagle_head.json").is_file():
        raise ValueError(f"--draft {path!r}: not 'ngram' and not a directory with an EAGLE head (eagle_head.json)")
    return EagleDrafter(model, EagleHead.load(path, model))


def _print(results: dict) -> None:
    table = Table(title=f"respec bench sd ({results['draft']} drafter, {results['device']})")
    for column in ("batch", "config", "tokens/s", "accept len", "speedup"):
        table.add_column(column, justify="right")
    for row in results["rows"]:
        table.add_row(str(row["batch"]), row["config"], f"{row['tokens_per_s']:.1f}", f"{row['accept_len']:.2f}",
                      f"{row['speedup']:.2f}x")
    table_console().print(table)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    configs = sorted({row["config"] for row in results["rows"]} - {"nosd"})
    for config in configs:
        points = [(row["batch"], row["speedup"]) for row in results["rows"] if row["config"] == config]
        axis.plot(*zip(*points, strict=True), marker="o", label=config)
    axis.axhline(1.0, color="grey", linestyle="--", label="no SD")
    axis.set_xscale("log", base=2)
    batches = sorted({row["batch"] for row in results["rows"]})
    axis.set_xticks(batches, [str(b) for b in batches])
    axis.set_xlabel("batch size (active rows)")
    axis.set_ylabel("speedup over no SD (same run)")
    axis.set_title(f"SD speedup vs batch size ({results['draft']} drafter)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_json(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
