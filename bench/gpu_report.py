"""Markdown tables of a bench/gpu.py JSON report (what bench/gpu.py prints at the end and
what docs/PERFORMANCE.md shows).

    python3 bench/gpu_report.py gpu.json [gpu_shapes.json ...]
"""

from __future__ import annotations

import json
import sys


def markdown(report: dict) -> str:
    parts = [f"device: {report['device']}, torch {report['torch']}, {report['date']}"]
    if "decode" in report:
        parts.append(decode_table(report))
    if "sweep" in report:
        parts.append(sweep_table(report))
    if "greedy_equality" in report:
        parts.append(greedy_table(report))
    if "rl" in report:
        parts.append(rl_table(report["rl"]))
    if "step_cost" in report:
        parts.append(step_cost_table(report["step_cost"]))
    return "\n\n".join(parts) + "\n"


def decode_table(report: dict) -> str:
    d, policy, head = report["decode"], report["policy"], report["head"]
    bandwidth = d["bandwidth"]["read_write_bytes_per_s"] / 1e12
    rows = [
        ("policy (0.5B shape, built-in vocabulary): held-out accuracy sampled / greedy",
         f"{policy['accuracy_sampled']:.3f} / {policy['accuracy_greedy']:.3f} after {policy['steps']} steps"),
        ("EAGLE head: final KL, unroll", f"{head['kl_last']:.3f}, {head['unroll']}"),
        ("weight bytes", f"{d['weight_bytes'] / 1e6:.0f} MB"),
        ("copy bandwidth (read + write)", f"{bandwidth:.2f} TB/s"),
        ("HBM floor (weight bytes / bandwidth)", f"{d['hbm_floor_s'] * 1e3:.3f} ms"),
        ("respec decode step, CUDA graph" + (" (Triton kernels)" if d.get("kernels") else ""),
         f"{d['graphed_step_s'] * 1e3:.3f} ms = {d['graphed_over_floor']:.1f}x the floor"),
        *([("respec decode step, CUDA graph, layers in PyTorch's kernels (no Triton)",
            f"{d['graphed_step_no_kernels_s'] * 1e3:.3f} ms")] if "graphed_step_no_kernels_s" in d else []),
        ("respec decode step, eager (same fused code)", f"{d['eager_step_s'] * 1e3:.3f} ms"),
        ("transformers eager `generate`, per token", f"{d['hf_eager_step_s'] * 1e3:.3f} ms = "
                                                     f"{d['hf_over_graphed']:.1f}x respec's graphed step"),
        ("greedy output equals transformers'", str(d["greedy_matches_transformers"])),
    ]
    return "| batch 1 | |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def sweep_table(report: dict) -> str:
    sweep = report["sweep"]
    keys = [k for k in sweep["table"][0]["speedup"] if k != "no_sd"]
    lines = ["| batch | no SD tok/s | " + " | ".join(keys) + " | scheduler / best static | scheduler's k |",
             "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    choice = sweep["profile"]["choice"]
    for row in sweep["table"]:
        speedups = " | ".join(f"{row['speedup'][k]:.2f}x" for k in keys)
        lines.append(f"| {row['batch']} | {row['no_sd']['tokens_per_s']:.0f} | {speedups} | "
                     f"{row['scheduler_over_best_static']:.2f} | {choice.get(str(row['batch']), choice.get(row['batch']))} |")
    accepted = ", ".join(f"k{k}: {v:.2f}" for k, v in sweep["profile"]["accepted_per_step"].items())
    return "\n".join(lines) + f"\n\nAccepted drafts per step (profile, other prompts): {accepted}."


def greedy_table(report: dict) -> str:
    rows = report["greedy_equality"]
    return "Greedy SD vs greedy plain decoding: " + "; ".join(
        f"{k}: {v['rows_differing']} of {v['rows']} rows differ (first divergence at token "
        f"{v['first_divergence']})" for k, v in rows.items()) + "." + _margins(rows)


def _margins(rows: dict) -> str:
    """The float32 logit gap between the two runs' tokens where they part (since 2026-11-26)."""
    margins = [m for v in rows.values() for m in v.get("margins", []) if m is not None]
    if not margins:
        return ""
    widest = max(margins, key=lambda m: abs(m["gap"]) / m["bf16_spacing"])
    return (f" Where they part, the float32 policy's logits of the two chosen tokens differ by "
            f"{min(abs(m['gap']) for m in margins):.3f}-{max(abs(m['gap']) for m in margins):.3f} "
            f"(at most {abs(widest['gap']) / widest['bf16_spacing']:.1f} bf16 spacings at that logit's size, "
            f"{len(margins)} divergences).")


def rl_table(rl: dict | list) -> str:
    if isinstance(rl, list):  # one table per RL batch size
        return "\n\n".join(rl_table(section) for section in rl)
    if "sync_sd" not in rl and "variants" not in rl:  # reports before the asynchronous variant (e740849)
        return _rl_table_before_async(rl)
    rows = rl["groups"] * rl["group_size"]
    # Reports before the two-GPU variants have no "variants" list (and not all of these before 720c4d3).
    variants = rl.get("variants", ["sync_nosd", "sync_sd", "respec", "respec_switch_5ms", "sync_nosd_again"])
    drafted = next(v for v in variants if "nosd" not in v and v in rl)
    live = "k_full" in rl[drafted]["steps"][0]  # the live scheduler (after 2eec63c)
    distill = rl.get("distill")  # recorded since the head's lr was lowered (after bfe7031)
    head = (f"; head update every {distill['every']} versions, {distill['samples']} rollouts, lr {distill['lr']:g}"
            if distill else "")
    lines = [f"{rows} rollouts per step ({rl['groups']} prompts x {rl['group_size']}), max_new {rl['max_new']}{head}:", "",
             f"| variant | step s (wall / steps) | x {variants[0]} | generation s | update s | distillation s | "
             "tokens / longest | drafts accepted per step | reward first third -> last third |"
             + (" k full batch / 1 row, first -> last step |" if live else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if live else "")]
    for variant in variants:
        if variant not in rl:
            continue
        v, mean = rl[variant], rl[variant]["mean"]
        ratio = 1.0 if variant == variants[0] else rl[f"{variant}_step_time_over_{variants[0]}"]
        first, last = v["steps"][0], v["steps"][-1]
        lines.append(f"| {variant} | {v['step_s']:.3f} | {ratio:.2f} | {mean['gen_s']:.3f} | {mean['train_s']:.3f} | "
                     f"{mean['distill_s']:.3f}{_publish(mean)} | {mean['tokens']:.0f} / {mean['longest']:.0f} | "
                     f"{mean['accepted_per_step']:.2f} | {v['reward_first_third']:.3f} -> {v['reward_last_third']:.3f} |"
                     + (f" {first['k_full']}/{first['k_one']} -> {last['k_full']}/{last['k_one']} |" if live else ""))
    sync = rl[variants[0]]["mean"]  # the baseline: sync_nosd, or sync_nosd_2gpu
    lines += ["", f"Generation is {sync['gen_s'] / (sync['gen_s'] + sync['train_s']):.0%} of a "
              f"{variants[0]} step."]
    if skipped := {v: rl[v]["skipped_updates"] for v in variants if rl.get(v, {}).get("skipped_updates")}:
        lines.append("Updates skipped for a non-finite gradient: " + ", ".join(f"{v} {n}" for v, n in skipped.items()))
    return "\n".join(lines)


def _publish(mean: dict) -> str:
    """The weight copy's seconds beside the distillation's, where the report has them."""
    return f" (+ {mean['publish_s']:.3f} publish)" if mean.get("publish_s") else ""


def _rl_table_before_async(rl: dict) -> str:
    lines = ["| variant | mean step s | generation s | update s | distillation s | reward first -> last (mean) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant in ("sync_nosd", "respec"):
        steps = rl[variant]["steps"]
        mean = {key: sum(s[key] for s in steps) / len(steps) for key in ("step_s", "gen_s", "train_s", "distill_s")}
        lines.append(f"| {variant} | {mean['step_s']:.3f} | {mean['gen_s']:.3f} | {mean['train_s']:.3f} | "
                     f"{mean['distill_s']:.3f} | {rl[variant]['reward_first']:.3f} -> {rl[variant]['reward_last']:.3f} "
                     f"({rl[variant]['reward_mean']:.3f}) |")
    return "\n".join(lines) + f"\n\nrespec step time / sync no-SD: {rl['respec_step_time_over_sync_nosd']:.2f}."


def step_cost_table(step_cost: dict) -> str:
    parts = []
    for shape, data in step_cost.items():
        curve = data["curve"]
        ks = [key for key in next(iter(curve.values())) if key.endswith("_s")]
        lines = [f"{shape} ({data['weight_bytes'] / 1e9:.1f} GB of weights), ms per step:", "",
                 "| batch | " + " | ".join(ks) + " | " + " | ".join(f"{k[:-2]}/k0" for k in ks[1:]) + " |",
                 "| --- | " + " | ".join("---" for _ in ks) + " | " + " | ".join("---" for _ in ks[1:]) + " |"]
        for batch, row in curve.items():
            lines.append(f"| {batch} | " + " | ".join(f"{row[k] * 1e3:.2f}" for k in ks) + " | "
                         + " | ".join(f"{row[k] / row['k0_s']:.2f}" for k in ks[1:]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(markdown(json.loads(open(path).read())))
