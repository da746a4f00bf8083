"""The GPU benchmark (issue 6): one run of at most 10 minutes on one H100.

    python3 bench/gpu.py --json gpu.json              # trained 0.5B shape: everything below
    python3 bench/gpu.py --shapes 3b,7b --json f.json # random weights: step-cost curve only
    python3 bench/gpu.py --smoke --json f.json        # a tiny shape on the CPU: checks the script

Full mode: (a) trains a policy of the Qwen2.5-0.5B shape on the built-in task (built-in
character vocabulary) and distils its EAGLE head; (b) decode step time at batch 1 against
the HBM floor (weight bytes over the device-to-device copy bandwidth measured here) and
against transformers' eager `generate` on the same weights; (c) generated tokens per
second at batch 1-256 for no SD, each static chain length and the scheduler's per-bucket
choice (from a profile on other prompts); (d) greedy SD against greedy plain decoding,
token for token; (e) synchronous GRPO steps, no SD against SD + scheduler + online
reward-weighted distillation (bench/gpu_rl.py). Prints tables and writes JSON; docs/PERFORMANCE.md records the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_report import markdown  # noqa: E402
from gpu_rl import KNOWN_VARIANTS, VARIANTS, Variant, rl_section  # noqa: E402
from gpu_timing import (  # noqa: E402
    compare,
    copy_bandwidth,
    hf_decode_seconds,
    release_cached_memory,
    throughput,
    weight_bytes,
)
from gpu_train import accuracy, log, random_model, shape_config, train_head, train_policy  # noqa: E402

from respec.engine.checkpoint import load_model, save_model  # noqa: E402
from respec.engine.drafters.eagle import EagleHead  # noqa: E402
from respec.engine.fast import FastGenerator  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402
from respec.sched.draft_lengths import choose_draft_lengths  # noqa: E402
from respec.tasks import make_task  # noqa: E402

# The built-in task in its longer setting: the embedded default's (max_value 9, 2-3
# operands) completions are ~14 tokens, too short for drafting to show; these are ~70.
TASK = ("arithmetic", {"max_value": 50, "min_operands": 5, "max_operands": 8})
SECTIONS = ("decode", "sweep", "greedy", "rl")
DRAFT_LENGTHS = (1, 2, 3, 4, 5, 6)


def main() -> None:
    args = parse_args()
    device = "cpu" if args.smoke else "cuda"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    started = time.perf_counter()
    if args.shapes:
        report["step_cost"] = step_cost_curves(args.shapes.split(","), device, args.batches)
    else:
        # Each finished section is written at once: a run cut off by the device's time limit
        # still leaves what it measured (marked partial).
        def save_partial(done: dict) -> None:
            Path(args.json).write_text(json.dumps({**report, **done, "partial": True}, indent=2))

        report.update(full_run(args, device, save_partial))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    log(f"wrote {args.json} ({report['wall_s']} s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, CPU, few steps: check the script")
    parser.add_argument("--shapes", default="", help="comma-separated shapes (3b,7b) for the step-cost mode")
    parser.add_argument("--sft-steps", type=int, default=1000, help="policy SFT steps (1000: what the measured runs used; their training, decode, sweep and greedy sections took 414-541 s on an H100)")
    parser.add_argument("--sft-bucket-pool", type=int, default=1, help="SFT batches cut by length from this many "
                        "batches' worth of examples (1: random batches; bucketing pads less but trains a worse "
                        "policy: bench/sft_bucketing.py)")
    parser.add_argument("--sft-label-smoothing", type=float, default=0.0, help="of the policy's SFT (respec prepare's "
                        "0.1 made the tiny policy one that RL on the norm gains improves, docs/RL.md; untried at "
                        "this shape); 0: the runs measured so far")
    parser.add_argument("--head-steps", type=int, default=1500)
    parser.add_argument("--head-sequences", type=int, default=4096, help="the policy's completions the head is "
                        "distilled on (half sampled, half greedy)")
    parser.add_argument("--sft-batch", type=int, default=128, help="problems per SFT step (64 fits an H100's 80 GB "
                        "with --operands 2,14)")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--rl-steps", type=int, default=12)
    parser.add_argument("--rl-groups", default="32", help="prompts per RL step (8 rollouts each); a list runs each")
    parser.add_argument("--operands", default="5,8", help="MIN,MAX operands of the task's problems: 2,14 gives "
                        "the long tail of rollout lengths RL has (a few rows run 5x the median)")
    parser.add_argument("--long-share", type=float, default=0.0, help="sweep: this share of each batch's rows "
                        "from the longest problems, the rest from the shortest (0.02 with --operands 2,14: a "
                        "rollout phase that spends most of its steps in a small tail); 0: the held-out problems "
                        "as they come")
    parser.add_argument("--cache", default="", help="a folder to keep the trained policy and head in: a later run "
                        "with the same folder (and task) loads them instead of training again")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which of " + ",".join(SECTIONS))
    parser.add_argument("--rl-lr", type=float, default=1e-5)
    parser.add_argument("--rl-variants", default=",".join(VARIANTS), help="RL variants in the order run, the first "
                        "the baseline (bench/gpu_rl.py); those ending in _2gpu update on a second GPU: "
                        + ",".join(sorted(KNOWN_VARIANTS)))
    parser.add_argument("--max-value", type=int, default=TASK[1]["max_value"], help="largest operand of the "
                        "task's problems (9 with many operands: long completions a small policy gets right)")
    args = parser.parse_args()
    if args.smoke:
        args.sft_steps, args.head_steps, args.batches, args.max_new = 30, 20, "1,4", 24
        args.rl_steps, args.rl_groups = 3, "2"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.rl_groups = [int(g) for g in args.rl_groups.split(",")]
    args.operands = tuple(int(n) for n in args.operands.split(","))
    if not 0.0 <= args.long_share <= 1.0:
        parser.error(f"--long-share must be within [0, 1], got {args.long_share}")
    args.sections = args.sections.split(",")
    args.rl_variants = tuple(args.rl_variants.split(","))
    if unknown := set(args.rl_variants) - KNOWN_VARIANTS:
        parser.error(f"--rl-variants: unknown {sorted(unknown)}; choose from {', '.join(sorted(KNOWN_VARIANTS))}")
    if any(Variant(v).two_gpus for v in args.rl_variants) and "rl" in args.sections and torch.cuda.device_count() < 2:
        parser.error(f"--rl-variants: the _2gpu variants need two GPUs; this machine has {torch.cuda.device_count()}")
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


# ---------------------------------------------------------------------- full mode


def full_run(args, device: str, save_partial=lambda done: None) -> dict:
    shape = "smoke" if args.smoke else "0.5b"
    low, high = args.operands
    settings = {**TASK[1], "max_value": args.max_value, "min_operands": low, "max_operands": high}
    task = make_task(TASK[0], **settings)
    tokenizer = char_tokenizer()
    heldout = task.heldout(256 if not args.smoke else 16, seed=12345)
    model, head, policy_report, head_report = trained_models(args, task, heldout, shape, device)
    prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in heldout]
    calibration = [[tokenizer.bos_id, *tokenizer.encode(task.sample(random.Random(f"calib{i}")).prompt)]
                   for i in range(64)]
    out = {"shape": shape, "task": {"name": TASK[0], **settings},
           "policy": policy_report, "head": head_report}
    save_partial(out)
    if "decode" in args.sections:
        out["decode"] = decode_section(model, prompts[0], device, args)
        save_partial(out)
    rl_rows = 8 * max(args.rl_groups) if "rl" in args.sections else 0
    profile = scheduler_profile(generator_for(model, head, device, args, max(*args.batches, rl_rows), 1.0),
                                calibration, device)
    release_cached_memory(device)  # the profile's generator, its KV store and graphs (over 14 GB at 4096 rows)
    out["profile"] = profile
    if "sweep" in args.sections:
        out["sweep"] = sweep_section(model, head, prompts, profile, device, args,
                                     on_row=lambda so_far: save_partial({**out, "sweep": so_far}))
        save_partial(out)
    if "greedy" in args.sections:
        out["greedy_equality"] = greedy_section(model, head, prompts[:64], device, args)
        save_partial(out)
    if "rl" in args.sections:
        out["rl"] = []
        for groups in args.rl_groups:
            done = out["rl"][:]
            out["rl"].append(rl_section(model, head, task, profile, args.rl_steps, groups, 8, args.max_new,
                                        args.rl_lr, log, args.rl_variants,
                                        on_variant=lambda so_far, done=done: save_partial({**out, "rl": [*done, so_far]})))
            save_partial(out)
    return out


def trained_models(args, task, heldout, shape: str, device: str):
    """(a): the policy (SFT) and its EAGLE head, or the ones a previous run left in --cache."""
    cache = Path(args.cache) if args.cache else None
    if cache is not None and (cache / "reports.json").exists():
        model = load_model(cache / "policy", device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        head = EagleHead.load(cache / "head", model).to(device=device, dtype=next(model.parameters()).dtype).eval()
        policy_report, head_report = json.loads((cache / "reports.json").read_text())
        log(f"policy and head loaded from {cache} (trained by an earlier run: {policy_report}, {head_report})")
        return model, head, {**policy_report, "loaded_from_cache": True}, head_report
    policy, policy_report = train_policy(task, shape, device, args.sft_steps, batch=args.sft_batch if not args.smoke else 8,
                                         bucket_pool=args.sft_bucket_pool, label_smoothing=args.sft_label_smoothing)
    model = policy.to(torch.bfloat16) if device == "cuda" else policy
    release_cached_memory(device)  # SFT's activations and optimiser: the generators' graphs need the room
    policy_report["accuracy_sampled"] = accuracy(model, task, heldout, 1.0, args.max_new)
    policy_report["accuracy_greedy"] = accuracy(model, task, heldout, 0.0, args.max_new)
    log(f"policy: {policy_report}")
    head, head_report = train_head(model, task, device, args.head_steps, max_new=args.max_new,
                                   sequences=args.head_sequences if not args.smoke else 64, batch=64 if not args.smoke else 8)
    head = head if device == "cuda" else head.float()
    release_cached_memory(device)
    log(f"head: {head_report}")
    if cache is not None:
        save_model(model, cache / "policy")
        char_tokenizer().save(cache / "policy")  # a whole checkpoint: `respec run` reads it (configs/gpu_fast.yaml)
        head.save(cache / "head")
        (cache / "reports.json").write_text(json.dumps([policy_report, head_report]))
    return model, head, policy_report, head_report


def generator_for(model, head, device: str, args, rows: int, temperature: float) -> FastGenerator:
    # 80: the longest prompt of the task settings used here (30 one-digit operands: 61 tokens).
    return FastGenerator(model, head, max_rows=rows, max_len=80 + args.max_new + max(DRAFT_LENGTHS) + 2,
                         max_new=args.max_new, max_k=max(DRAFT_LENGTHS) if head is not None else 0,
                         temperature=temperature, eos_ids=(char_tokenizer().eos_id,))


def decode_section(model, prompt: list[int], device: str, args) -> dict:
    """(b): one decode step at batch 1: graphs, eager, the HBM floor, transformers."""
    bandwidth = copy_bandwidth(device, gib=1.0 if device == "cuda" else 0.05)
    plain = generator_for(model, None, device, args, 1, 0.0)
    graphed = plain.time_step(1, 0, 200 if device == "cuda" else 5)
    # The same graphed step with every layer in PyTorch's kernels (the fused path): what
    # the Triton kernels (respec/engine/fast/kernels.py) are worth.
    no_kernels = FastGenerator(model, None, max_rows=1, max_len=plain.state.max_len, max_new=args.max_new,
                               kernels=False)
    graphed_no_kernels = no_kernels.time_step(1, 0, 200 if device == "cuda" else 5)
    eager = FastGenerator(model, None, max_rows=1, max_len=plain.state.max_len, max_new=args.max_new, graphs=False)
    eager_s = eager.time_step(1, 0, 20 if device == "cuda" else 3)
    weights = weight_bytes(model)
    floor = weights / bandwidth["read_write_bytes_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        hf = hf_decode_seconds(tmp, prompt, device, new_tokens=64 if device == "cuda" else 8)
    ours = plain.generate([prompt], 0)[0].tokens
    same = ours[: len(hf["greedy_tokens"])] == hf["greedy_tokens"][: len(ours)]
    section = {"weight_bytes": weights, "bandwidth": bandwidth, "hbm_floor_s": floor,
               "hbm_floor_one_way_s": weights / bandwidth["one_way_bytes_per_s"], "graphed_step_s": graphed,
               "kernels": plain.kernels_on, "graphed_step_no_kernels_s": graphed_no_kernels,
               "eager_step_s": eager_s, "hf_eager_step_s": hf["seconds_per_token"],
               "graphed_over_floor": graphed / floor, "hf_over_graphed": hf["seconds_per_token"] / graphed,
               "greedy_matches_transformers": same}
    log("decode at batch 1: " + json.dumps({k: v for k, v in section.items() if k != "bandwidth"}))
    return section


def sweep_section(model, head, prompts, profile: dict, device: str, args, on_row=lambda so_far: None) -> dict:
    """(c): tokens per second per batch size: no SD, each chain length, the scheduler
    (its per-bucket choice from `profile`, measured on other prompts). `on_row(section so
    far)` after each batch size."""
    rows = max(args.batches)
    plain = generator_for(model, None, device, args, rows, 1.0)
    drafted = generator_for(model, head, device, args, rows, 1.0)
    table = []
    for b in args.batches:
        batch = long_tailed(prompts, b, args.long_share) if args.long_share else cycled(prompts, b)
        configs = {"no_sd": (plain, 0), **{f"k{k}": (drafted, k) for k in DRAFT_LENGTHS},
                   "scheduler": (drafted, profile["choice"])}
        row = {"batch": b, **compare(configs, batch, device)}
        base = row["no_sd"]["tokens_per_s"]
        best = max(v["tokens_per_s"] for key, v in row.items() if key not in ("batch", "scheduler"))
        row["speedup"] = {key: v["tokens_per_s"] / base for key, v in row.items() if isinstance(v, dict)}
        row["scheduler_over_best_static"] = row["scheduler"]["tokens_per_s"] / best
        table.append(row)
        log(f"batch {b}: " + " ".join(f"{key} {x:.2f}x" for key, x in row["speedup"].items())
            + f" | scheduler/best {row['scheduler_over_best_static']:.2f}")
        on_row({"profile": profile, "table": table})
    return {"profile": profile, "table": table}


def long_tailed(prompts: list[list[int]], size: int, long_share: float) -> list[list[int]]:
    """`size` prompts: `long_share` of them from the longest quarter (by prompt length, so
    the most operands and the longest completions), the rest from the shortest half. Most
    rows finish early and a few run on at a small batch, as RL's rollouts do (a few
    responses many times the median), where the uniform operand counts of --operands give
    lengths spread evenly."""
    by_length = sorted(prompts, key=len)
    short, long = by_length[: max(1, len(by_length) // 2)], by_length[-max(1, len(by_length) // 4):]
    longs = round(size * long_share)
    return cycled(long, longs) + cycled(short, size - longs)


def cycled(pool: list[list[int]], n: int) -> list[list[int]]:
    """`n` items of `pool`, repeating it as often as needed."""
    return (pool * (n // len(pool) + 1))[:n]


def scheduler_profile(generator: FastGenerator, calibration, device: str) -> dict:
    """Step cost per (bucket, k) on dummy rows and acceptance per k on calibration prompts
    (not the measured ones): what the scheduler decides from."""
    cost = {(b, k): generator.time_step(b, k, 20)
            for b in generator.buckets for k in (0, *DRAFT_LENGTHS)}
    calibration = calibration[: generator.state.rows]
    accepted = {k: throughput(generator, calibration, k, device, repeats=1)["accepted_per_step"]
                for k in DRAFT_LENGTHS}
    choice = choose_draft_lengths(cost, accepted)
    log(f"scheduler profile: accepted per step {accepted}; choice {choice}")
    return {"step_s": {f"{b}/{k}": s for (b, k), s in cost.items()}, "accepted_per_step": accepted,
            "choice": choice}


def greedy_section(model, head, prompts, device: str, args) -> dict:
    """(d): greedy SD against greedy plain decoding on the same prompts."""
    plain = generator_for(model, None, device, args, len(prompts), 0.0).generate(prompts, 0)
    drafted = generator_for(model, head, device, args, len(prompts), 0.0)
    reference = copy.deepcopy(model).float()  # where the two runs part: how close the call was
    out = {}
    for k in (1, 4, 6):
        results = drafted.generate(prompts, k)
        differ = [i for i, (a, b) in enumerate(zip(plain, results, strict=True)) if a.tokens != b.tokens]
        out[f"k{k}"] = {"rows": len(prompts), "rows_differing": len(differ),
                        "first_divergence": [first_divergence(plain[i].tokens, results[i].tokens) for i in differ[:5]],
                        "margins": [divergence_margin(reference, prompts[i], plain[i].tokens, results[i].tokens)
                                    for i in differ]}
    del reference
    log(f"greedy equality: {out}")
    return out


def divergence_margin(reference, prompt: list[int], plain: list[int], drafted: list[int]) -> dict | None:
    """At the first token where the two runs differ: the float32 policy's logits of the token
    each run chose, their gap, and bf16's spacing at that logit's size. A gap of a few
    spacings is a tie that bf16 rounding of a different kernel shape can flip; a large one
    would be a bug. None where one run merely ended first."""
    d = first_divergence(plain, drafted)
    if d >= min(len(plain), len(drafted)):
        return None
    device = next(reference.parameters()).device
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + plain[:d]], device=device)).logits[0, -1].float()
    ours, theirs = float(logits[plain[d]]), float(logits[drafted[d]])
    spacing = 2.0 ** (math.floor(math.log2(max(abs(ours), 1e-30))) - 7)  # bf16: 8 significant bits
    return {"at": d, "plain_logit": round(ours, 4), "drafted_logit": round(theirs, 4),
            "gap": round(ours - theirs, 4), "bf16_spacing": spacing,
            "top_gap": round(float(logits.topk(2).values.diff().abs()), 4)}


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------- step-cost mode


def step_cost_curves(shapes: list[str], device: str, batches: list[int], ks=(0, 2, 4, 6)) -> dict:
    """Seconds per step at each batch size: plain decoding (k = 0) and SD steps of k drafts
    (k - 1 head passes, verification of k + 1 tokens, the head's catch-up), random weights,
    full Qwen vocabulary: how the cost of a step grows with k and the batch. A random head
    proposes garbage, but a step costs the same whatever it proposes: no acceptance claims."""
    out = {}
    for shape in shapes:
        model = random_model(shape_config(shape), device)
        head = EagleHead.for_target(model).eval()
        generator = FastGenerator(model, head, max_rows=max(batches), max_len=512, max_new=256, max_k=max(ks))
        curve = {}
        for b in batches:
            curve[b] = {f"k{k}_s": generator.time_step(b, k, 10) for k in ks}
            curve[b].update({f"k{k}_over_k0": curve[b][f"k{k}_s"] / curve[b]["k0_s"] for k in ks[1:]})
            log(f"{shape} batch {b}: " + " ".join(f"k{k} {curve[b][f'k{k}_s'] * 1e3:.2f} ms" for k in ks))
        out[shape] = {"weight_bytes": weight_bytes(model), "curve": curve}
        del model, head, generator
        release_cached_memory(device)
    return out


if __name__ == "__main__":
    main()
