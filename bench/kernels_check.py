"""The fast path's Triton kernels on a GPU: do they compute what the fused PyTorch layers
compute (bf16), and what do they save per step? A random model of a Qwen2.5 shape with
the built-in vocabulary (the bench's policy shape), with and without the kernels.

    python3 bench/kernels_check.py --json f.json [--shape 0.5b] [--pdl]
    RESPEC_KERNEL_ROWS=128 python3 bench/kernels_check.py --json f.json --batches 16,32 --ks 3,4,5,6   # passes past 64 tokens

Prints, per (batch, tokens per row), the largest logit difference against the logits'
spread and how often the argmax agrees; then the graphed step time with and without the
kernels for decoding and SD steps at small batch, and the HBM floor at batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_timing import copy_bandwidth, weight_bytes  # noqa: E402
from gpu_train import log, random_model, shape_config  # noqa: E402

from respec.engine.drafters.eagle import EagleHead  # noqa: E402
from respec.engine.fast import FastGenerator  # noqa: E402
from respec.engine.fast.fused import FusedModel  # noqa: E402
from respec.engine.fast.state import FastState, StaticKV  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402

DEVICE = "cuda"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--ks", default="0,3,6")
    parser.add_argument("--pdl", action="store_true", help="also with programmatic dependent launch (Hopper)")
    parser.add_argument("--product-configs", action="store_true",
                        help="time every one-row GEMV configuration (the tuner's and SWEEP_EXTRA) per product, graphed")
    parser.add_argument("--device", default="cuda", help="cpu: a check of the script (TRITON_INTERPRET=1, --shape smoke)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    model = random_model(shape_config(args.shape, tokenizer=char_tokenizer()), DEVICE,
                         dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    head = EagleHead.for_target(model).to(next(model.parameters()).dtype).eval()
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "shape": args.shape,
              "agreement": [agreement(model, b, t) for b, t in ((1, 1), (2, 4), (4, 4), (1, 7), (16, 1), (64, 3), (64, 5))]}
    if args.pdl:
        report["pdl_agreement"] = [pdl_agreement(model, b, t) for b, t in ((1, 1), (4, 4), (16, 1))]
    bandwidth = copy_bandwidth(DEVICE, gib=1.0 if DEVICE == "cuda" else 0.05)
    floor = weight_bytes(model) / bandwidth["read_write_bytes_per_s"]
    report["hbm_floor_s"], report["bandwidth"] = floor, bandwidth
    if DEVICE == "cuda":
        report["products"] = product_times(model, args.product_configs)
    if args.pdl:
        report["pdl_greedy_equal"] = pdl_greedy_equal(model, head)
        if DEVICE == "cuda":
            report["pdl_graphed_agreement"] = [pdl_graphed_agreement(model, b, t) for b, t in ((1, 1), (8, 1), (8, 5))]
    report["steps"] = step_times(model, head, [int(b) for b in args.batches.split(",")],
                                 [int(k) for k in args.ks.split(",")], args.pdl)
    if DEVICE == "cuda":
        from respec.engine.fast import tuner

        report["tuned"] = {repr(key): config for key, config in tuner.chosen.items()}  # (n, k, flags) -> choice
        log(f"tuned: {report['tuned']}")
    decode = report["steps"].get("1", {}).get("k0")  # batch 1, no drafts: against the floor, where timed
    if decode is not None:
        report["decode_over_floor"] = {name: decode[name] / floor for name in ("kernels", "pytorch")}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(table(report))
    log(f"wrote {args.json}")


def table(report: dict) -> str:
    """Markdown: the graphed step per (batch, k) with and without the kernels, and the floor."""
    pdl = "pdl_greedy_equal" in report
    lines = [f"{report['device']}, {report['shape']} shape, random weights; HBM floor at batch 1: "
             f"{report['hbm_floor_s'] * 1e3:.3f} ms", "",
             "| batch | k | kernels ms | PyTorch's kernels ms | ratio | wide route ms | wide / kernels |"
             + (" kernels + PDL ms | PDL / kernels | PDL with weight prefetch / kernels |" if pdl else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if pdl else "")]
    for b, by_k in report["steps"].items():
        for k, times in by_k.items():
            lines.append(f"| {b} | {k[1:]} | {times['kernels'] * 1e3:.3f} | {times['pytorch'] * 1e3:.3f} | "
                         f"{times['kernels_over_pytorch']:.2f} | "
                         + (f"{times['wide'] * 1e3:.3f} | {times['wide_over_kernels']:.2f} |" if "wide" in times
                            else "(the same) | |")
                         + (f" {times['kernels_pdl'] * 1e3:.3f} | {times['pdl_over_kernels']:.2f} | "
                            f"{times['pdl_prefetch_over_kernels']:.2f} |" if pdl else ""))
    one_row = [(k, times) for k, times in report["steps"].get("1", {}).items() if "kernels_attend_o" in times]
    if one_row:
        lines += ["", "| batch 1, k | attention and output product in one kernel ms | in two ms | one / two |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {k[1:]} | {times['kernels_attend_o'] * 1e3:.3f} | {times['kernels'] * 1e3:.3f} | "
                  f"{times['attend_o_over_apart']:.2f} |" for k, times in one_row]
    if pdl:
        lines += ["", f"Greedy rows identical, of 8 (graphed; PDL off twice, on twice, off against on): "
                      f"{report['pdl_greedy_equal']}", "",
                  "| b | t | PDL vs no PDL: max logit diff | argmax agrees | no PDL vs PyTorch: max diff | PDL vs PyTorch: max diff |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in report["pdl_agreement"]:
            lines.append(f"| {row['pdl']['b']} | {row['pdl']['t']} | {row['pdl_vs_no_pdl_max_abs_diff']:.4f} | "
                         f"{row['pdl_vs_no_pdl_argmax_agrees']:.2f} | {row['no_pdl']['max_abs_diff']:.4f} | "
                         f"{row['pdl']['max_abs_diff']:.4f} |")
        lines.append("")
        for row in report.get("pdl_graphed_agreement", []):
            lines.append(f"Graphed pass {row['b']}x{row['t']}, max logit difference from the eager pass: "
                         + ", ".join(f"{key.removesuffix('_vs_eager_max_abs_diff')} {value:.4f}"
                                     for key, value in row.items() if key.endswith("_max_abs_diff")))
    return "\n".join(lines)


@contextlib.contextmanager
def kernel_switches(**values):
    """The kernels' module switches (PDL, PDL_KERNELS, PDL_PREFETCH, ATTEND_O) set for a
    block, then put back as they were: launches read them at each call, so a graph captured
    inside the block keeps them."""
    from respec.engine.fast import kernels as triton_kernels

    before = {name: getattr(triton_kernels, name) for name in values}
    for name, value in values.items():
        setattr(triton_kernels, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(triton_kernels, name, value)


def pdl_agreement(model, b: int, t: int) -> dict:
    """One cached pass with the kernels under PDL against the same pass without it (and
    each against the fused PyTorch layers). The two builds of a kernel may round
    differently (the compiler contracts multiply-adds per build), so a difference of bf16
    size is not a race; a race reads stale activations or stores and shows as a difference
    the size of the logits themselves."""
    out = {}
    for name, with_pdl in (("no_pdl", False), ("pdl", True)):
        with kernel_switches(PDL=with_pdl):
            out[name] = agreement(model, b, t, keep_logits=True)
    ours, theirs = out["pdl"].pop("logits"), out["no_pdl"].pop("logits")
    out["pdl_vs_no_pdl_max_abs_diff"] = (ours - theirs).abs().max().item()
    out["pdl_vs_no_pdl_argmax_agrees"] = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    log(f"PDL agreement b={b} t={t}: {out}")
    return out


PDL_ALONE = ("gemv", "qkv_rope", "attend")  # the kernels of a pass of several rows, each under PDL alone


def pdl_graphed_agreement(model, b: int, t: int) -> dict:
    """One cached pass with the kernels captured in a CUDA graph and replayed, without PDL,
    with it, and with it for one kind of kernel at a time, against the same pass run
    eagerly without it. Graph-replayed greedy generation with PDL differs from generation
    without it in every row, repeatably (H100, 6c88d12), and one graphed pass under PDL
    gave NaN at 8x1 tokens and logits 3.7 off at 8x5 (b6c4926) while eager passes are
    bit-identical: the kernel whose PDL alone breaks the pass is where to look."""
    prefix, tokens, positions = pass_inputs(model, b, t)
    logits = {}
    # (name, PDL, graphed, the kernels under PDL (None: all), PDL's weight prefetch)
    variants = [("eager", False, False, None, True), ("graph", False, True, None, True),
                ("graph_pdl", True, True, None, False), ("graph_pdl_prefetch", True, True, None, True),
                *((f"graph_pdl_{kind}", True, True, frozenset({kind}), False) for kind in PDL_ALONE)]
    for name, with_pdl, graphed, only, prefetch in variants:
        state, fused = prefilled(model, prefix), FusedModel(model, kernels=True)
        with torch.no_grad(), kernel_switches(PDL=with_pdl, PDL_KERNELS=only, PDL_PREFETCH=prefetch):
            out = run(fused, tokens, positions, state)  # compiles and tunes; rewrites the same keys when replayed
            if graphed:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = run(fused, tokens, positions, state)
                graph.replay()
                torch.cuda.synchronize()
        logits[name] = out.float().clone()
    result = {"b": b, "t": t, **{f"{name}_vs_eager_max_abs_diff": (logits[name] - logits["eager"]).abs().max().item()
                                 for name in logits if name != "eager"}}
    log(f"PDL graphed agreement: {result}")
    return result


def pdl_greedy_equal(model, head, rows: int = 8, new: int = 96) -> dict:
    """Greedy generation (plain and k4) on random prompts with the kernels, in CUDA graphs:
    how many of the rows are token for token the same between two generators without PDL
    (is graph replay repeatable at all?), two with it, and one of each. In an H100 run
    every row differed between with and without while one eager pass was bit-identical
    (docs/PERFORMANCE.md, "Kernels after a6d97bf"); the first two counts say whether the
    cause is PDL or the graphed step itself."""
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, model.config.vocab_size, (12 + 3 * i,), generator=generator).tolist()
               for i in range(rows)]
    out = {}
    for k in (0, 4):
        tokens = {}
        for name, with_pdl in (("off", False), ("off_again", False), ("on", True), ("on_again", True)):
            with kernel_switches(PDL=with_pdl):
                fast = FastGenerator(model, head if k else None, max_rows=rows, max_len=256, max_new=new, max_k=4)
                tokens[name] = [r.tokens for r in fast.generate(prompts, k)]
            del fast
        for first, second in (("off", "off_again"), ("on", "on_again"), ("off", "on")):
            out[f"k{k}_{first}_vs_{second}"] = sum(a == b for a, b in zip(tokens[first], tokens[second], strict=True))
    log(f"greedy rows identical (of {rows}): {out}")
    return out


def agreement(model, b: int, t: int, keep_logits: bool = False) -> dict:
    """One cached pass of t tokens per row after a 40-token prefix, kernels against the
    fused layers, on identical stores (keep_logits: the kernels' logits too)."""
    prefix, tokens, positions = pass_inputs(model, b, t)
    logits = []
    for kernels in (True, False):
        state = prefilled(model, prefix)
        with torch.no_grad():
            out = run(FusedModel(model, kernels=kernels), tokens, positions, state)
        logits.append(out.float())
    ours, theirs = logits
    result = {"b": b, "t": t, "max_abs_diff": (ours - theirs).abs().max().item(), "logit_std": theirs.std().item(),
              "argmax_agrees": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()}
    log(f"agreement: {result}")
    return {**result, "logits": ours} if keep_logits else result


def pass_inputs(model, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 40-token prefix per row, then t tokens after it and their positions: random,
    seeded by (b, t), so every build a check compares sees the same."""
    generator = torch.Generator(device=DEVICE).manual_seed(b * 100 + t)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (b, 40), device=DEVICE, generator=generator)
    tokens = torch.randint(0, vocab, (b, t), device=DEVICE, generator=generator)
    return prefix, tokens, 40 + torch.arange(t, device=DEVICE).repeat(b, 1)


def prefilled(model, prefix) -> FastState:
    """A fresh store holding the prefix's keys and values, written by the fused PyTorch
    layers (the same store whatever is checked after it)."""
    b, length = prefix.shape
    state = FastState(model.config, b, 64, 8, next(model.parameters()).dtype, torch.device(DEVICE))
    with torch.no_grad():
        run(FusedModel(model, kernels=False), prefix, torch.arange(length, device=DEVICE).repeat(b, 1), state)
    return state


def run(fused: FusedModel, tokens, positions, state: FastState):
    kv = StaticKV(state.k, state.v, positions)
    return fused.run(tokens, positions, kv)[0]


# One-row configurations (BLOCK_N, BLOCK_K, warps, splits) beyond the tuner's, for
# --product-configs: more programs (splits of k) and more bytes in flight per program.
SWEEP_EXTRA = ((4, 512, 4, 4), (4, 256, 4, 8), (2, 512, 4, 4), (2, 1024, 4, 2), (4, 1024, 4, 2), (8, 256, 4, 8),
               (4, 1024, 8, 1), (2, 2048, 4, 1), (4, 2048, 8, 1), (8, 1024, 4, 2), (16, 512, 8, 2))


def product_times(model, every_config: bool = False) -> dict:
    """Each product of a layer at one row alone, 50 in a CUDA graph: microseconds and the
    bandwidth it reaches, Triton's GEMV against cuBLAS (F.linear) on the same weights, and
    Triton's with its weights left in L2 between calls; with
    every_config, each one-row configuration's time too (what the tuner's pick leaves)."""
    from respec.engine.fast import kernels
    from respec.engine.fast.fused import FusedLayer

    fused = FusedLayer(model.model.layers[0])
    layer = fused.layer
    hidden, inter = model.config.hidden_size, layer.mlp.down_proj.in_features
    x, act = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16), torch.randn(1, inter, device="cuda",
                                                                                        dtype=torch.bfloat16)
    norm = (layer.input_layernorm.weight, 1e-6)
    products = {
        "qkv": (lambda config=None: kernels.gemv(x, fused.qkv_weight, fused.qkv_weight.shape[0], norm=norm,
                                                 bias=fused.qkv_bias, config=config),
                lambda: torch.nn.functional.linear(x, fused.qkv_weight, fused.qkv_bias), fused.qkv_weight),
        "o": (lambda config=None: kernels.gemv(x, layer.self_attn.o_proj.weight, hidden, residual=x, config=config),
              lambda: torch.nn.functional.linear(x, layer.self_attn.o_proj.weight), layer.self_attn.o_proj.weight),
        "gate_up": (lambda config=None: kernels.gemv(x, fused.gate_up_weight, inter, norm=norm, gated=True,
                                                     config=config),
                    lambda: torch.nn.functional.linear(x, fused.gate_up_weight), fused.gate_up_weight),
        "down": (lambda config=None: kernels.gemv(act, layer.mlp.down_proj.weight, hidden, residual=x, config=config),
                 lambda: torch.nn.functional.linear(act, layer.mlp.down_proj.weight), layer.mlp.down_proj.weight),
    }
    out = {}
    for name, (ours, theirs, weight) in products.items():
        bytes_read = weight.numel() * weight.element_size()
        out[name] = {"bytes": bytes_read, **{label: graphed_us(work) for label, work in (("triton_us", ours),
                                                                                     ("cublas_us", theirs))}}
        out[name]["triton_tb_per_s"] = bytes_read / out[name]["triton_us"] / 1e6
        # The same calls back to back with no flush: the weights (2-17 MB) stay in L2, so this
        # is what the kernel costs when memory is not what it waits for.
        out[name]["triton_l2_us"] = graph_us(ours, 50)
        if every_config:
            out[name]["configs_us"] = config_times(ours)
        log(f"product {name}: {out[name]}")
    return out


def config_times(product) -> dict:
    """Graphed microseconds of one product under each one-row configuration that builds."""
    from triton.runtime.errors import OutOfResources

    from respec.engine.fast import kernels

    times = {}
    for config in dict.fromkeys(kernels.CANDIDATES[1] + SWEEP_EXTRA):
        try:
            times[repr(config)] = graphed_us(lambda config=config: product(config))
        except OutOfResources:
            continue
    return dict(sorted(times.items(), key=lambda item: item[1]))


def graphed_us(work, calls: int = 50) -> float:
    """Per call, in a graph of `calls` calls each after a 64 MB read (more than the L2): the
    weights come from HBM as in a step. The reads' own time is measured and taken off."""
    flush = torch.ones(16 << 20, dtype=torch.float32, device="cuda")  # read, as the tuner does
    return graph_us(lambda: (flush.sum(), work()), calls) - graph_us(flush.sum, calls)


def graph_us(work, calls: int) -> float:
    from respec.engine.fast import tuner

    for _ in range(3):
        work()  # compiles and tunes
    return tuner.graph_ms(work, calls, replays=10) * 1e3


def step_times(model, head, batches: list[int], ks: list[int], pdl: bool = False) -> dict:
    """Graphed step seconds per batch and k, with the kernels and without (and with the
    kernels under PDL); where the pass fits the GEMV kernels, through the wide route too
    (cuBLAS products: kernel_layer.py)."""
    from respec.engine.fast import kernels as triton_kernels

    out = {}
    for b in batches:
        out[str(b)] = {}
        for k in ks:
            times = {}
            # (name, kernels, PDL, PDL's weight prefetch, attend_o)
            variants = [("kernels", True, False, True, False), ("pytorch", False, False, True, False)]
            if b * (k + 1) <= triton_kernels.MAX_ROWS:  # the GEMV kernels' pass: against the wide route's too
                variants.append(("wide", True, False, True, False))
            if b == 1:  # one row: attention and the output product in one kernel (opt-in), or in two
                variants.append(("kernels_attend_o", True, False, True, True))
            if pdl:
                variants += [("kernels_pdl", True, True, False, False), ("kernels_pdl_prefetch", True, True, True, False)]
            for name, kernels, with_pdl, prefetch, attend_o in variants:
                rows = {"MAX_ROWS": 0} if name == "wide" else {}  # every pass past 0 tokens: the wide route
                with kernel_switches(PDL=with_pdl, PDL_PREFETCH=prefetch, ATTEND_O=attend_o, **rows):
                    generator = FastGenerator(model, head if k else None, max_rows=b, max_len=256, max_new=128,
                                              max_k=max(ks), kernels=kernels)
                    times[name] = generator.time_step(b, k, 100 if DEVICE == "cuda" else 2)
                del generator
            times["kernels_over_pytorch"] = times["kernels"] / times["pytorch"]
            if "wide" in times:
                times["wide_over_kernels"] = times["wide"] / times["kernels"]
                log(f"batch {b} k {k}: the wide route {times['wide'] * 1e3:.3f} ms, the GEMV kernels' "
                    f"{times['kernels'] * 1e3:.3f} ms ({times['wide_over_kernels']:.2f}x)")
            if b == 1:
                times["attend_o_over_apart"] = times["kernels_attend_o"] / times["kernels"]
                log(f"batch 1 k {k}: attention and output product in one kernel {times['kernels_attend_o'] * 1e3:.3f} "
                    f"ms, apart {times['kernels'] * 1e3:.3f} ms ({times['attend_o_over_apart']:.2f}x)")
            if pdl:
                times["pdl_over_kernels"] = times["kernels_pdl"] / times["kernels"]
                times["pdl_prefetch_over_kernels"] = times["kernels_pdl_prefetch"] / times["kernels"]
                log(f"batch {b} k {k}: with PDL {times['kernels_pdl'] * 1e3:.3f} ms ({times['pdl_over_kernels']:.2f}x)")
            out[str(b)][f"k{k}"] = times
            log(f"batch {b} k {k}: kernels {times['kernels'] * 1e3:.3f} ms, pytorch {times['pytorch'] * 1e3:.3f} ms "
                f"({times['kernels_over_pytorch']:.2f}x)")
    return out


if __name__ == "__main__":
    main()
