"""Does asking the L2 cache to fetch a matrix ahead make the GEMV that reads it faster?
A probe for the fast path's kernels on a Hopper GPU (a tool, not a result).

A layer's one-row products take 1.6x as long with their weights in HBM as with them in
L2 (kernels_check's `triton_l2_us`). A kernel at a layer's start that asked L2 for the
layer's weights with Hopper's bulk prefetch made the step slower instead (removed;
docs/PERFORMANCE.md). This separates the questions: does a prefetch land in L2 at all,
and how much lead does it need? For the gate-up and down weights of the 0.5B shape, per
call in one CUDA graph:

    flush L2 (a 64 MB read) -> ahead (nothing | bulk prefetch | line prefetch | a full
    read) -> a spin of `lead` us -> the GEMV

The GEMV's time is the graph's with it minus the graph's without it.

    python3 bench/l2_probe.py --json probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_train import log, random_model, shape_config  # noqa: E402

from respec.engine.fast import kernels, tuner  # noqa: E402
from respec.engine.fast.fused import FusedLayer  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402

CHUNK = 16384  # bytes per bulk prefetch
LINE = 128  # bytes per line prefetch


@triton.jit
def _bulk_prefetch(w_ptr, size, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Each thread asks L2 for one CHUNK of the size bytes at w_ptr (cp.async.bulk.prefetch.L2)."""
    offsets = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    left = size - offsets
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r,r", [w_ptr.to(tl.pointer_type(tl.int8)) + offsets, tl.minimum(tl.maximum(left, 0), CHUNK).to(tl.int32),
                     (left > 0).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _line_prefetch(w_ptr, size, LINE: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Each thread asks L2 for one LINE of the size bytes at w_ptr (prefetch.global.L2)."""
    offsets = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * LINE
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [w_ptr.to(tl.pointer_type(tl.int8)) + offsets, (offsets < size).to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


def ahead_work(weight: torch.Tensor, how: str):
    size = weight.numel() * weight.element_size()
    if how == "none":
        return lambda: None
    if how == "bulk":
        programs = triton.cdiv(size, CHUNK * 32)
        return lambda: _bulk_prefetch[(programs,)](weight, size, CHUNK=CHUNK, PER_PROGRAM=32, num_warps=1)
    if how == "lines":
        programs = triton.cdiv(size, LINE * 128)
        return lambda: _line_prefetch[(programs,)](weight, size, LINE=LINE, PER_PROGRAM=128, num_warps=4)
    if how == "read":
        return lambda: weight.sum()
    raise ValueError(how)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--leads", default="0,5,20", help="microseconds of spin between the ahead step and the GEMV")
    args = parser.parse_args()
    model = random_model(shape_config("0.5b", tokenizer=char_tokenizer()), "cuda", dtype=torch.bfloat16)
    fused = FusedLayer(model.model.layers[0])
    layer = fused.layer
    hidden, inter = model.config.hidden_size, layer.mlp.down_proj.in_features
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(1, inter, device="cuda", dtype=torch.bfloat16)
    norm = (layer.post_attention_layernorm.weight, 1e-6)
    products = {"gate_up": (fused.gate_up_weight, lambda: kernels.gemv(x, fused.gate_up_weight, inter, norm=norm,
                                                                       gated=True)),
                "down": (layer.mlp.down_proj.weight, lambda: kernels.gemv(act, layer.mlp.down_proj.weight, hidden,
                                                                          residual=x))}
    flush = torch.ones(16 << 20, dtype=torch.float32, device="cuda")
    cycles_per_us = torch.cuda.get_device_properties(0).clock_rate / 1e3  # kHz -> cycles per us
    report = {"device": torch.cuda.get_device_name(), "results": {}}
    for name, (weight, gemv) in products.items():
        gemv()  # compiles and tunes
        for how in ("none", "bulk", "lines", "read"):
            ahead = ahead_work(weight, how)
            for lead in [int(v) for v in args.leads.split(",")]:
                def before(ahead=ahead, lead=lead):
                    flush.sum()
                    ahead()
                    if lead:
                        torch.cuda._sleep(int(lead * cycles_per_us))

                def with_gemv(before=before, gemv=gemv):
                    before()
                    gemv()

                for _ in range(2):
                    with_gemv()
                us = (tuner.graph_ms(with_gemv, 30, replays=10) - tuner.graph_ms(before, 30, replays=10)) * 1e3
                report["results"][f"{name} {how} lead {lead}"] = us
                log(f"{name}: ahead {how}, lead {lead} us: GEMV {us:.2f} us")
    Path(args.json).write_text(json.dumps(report, indent=2))
    lines = ["| product | ahead | " + " | ".join(f"lead {lead} us" for lead in args.leads.split(",")) + " |",
             "| --- | --- |" + " --- |" * len(args.leads.split(","))]
    for name in products:
        for how in ("none", "bulk", "lines", "read"):
            lines.append(f"| {name} | {how} | " + " | ".join(
                f"{report['results'][f'{name} {how} lead {lead}']:.2f}" for lead in args.leads.split(",")) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
