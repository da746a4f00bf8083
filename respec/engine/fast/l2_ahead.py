"""Products ask L2 for a later product's weights once their own are on their way (Hopper
on; opt-in: RESPEC_L2_AHEAD=next or early).

A one-row product takes ~60% as long with its weights in L2 as with them in HBM, and a
bulk prefetch issued just before it recovers about half of that (bench/l2_probe.py on an
H100: gate-up 8.3 -> 7.1 us, down 5.9 -> 4.2 us). A separate prefetch kernel cost as much
as it saved (docs/PERFORMANCE.md), so here the kernel already running asks: after its
own weight loads are issued, each program asks for its share of the next matrix
(`cp.async.bulk.prefetch.L2`, 16 KB per request), so those bytes stream in behind its own
and the later kernel finds them in L2. A prefetch is a hint: no value changes anywhere.

Which product asks for which (kernel_layer.py): "next", each for the one after it (qkv for
the output product's, that for gate-up's, gate-up for down's); "early", the large ones
sooner (qkv for gate-up's, the output product for down's), so they stream in while
attention and the small products run.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MODE = os.environ.get("RESPEC_L2_AHEAD", "0")  # "0", "next" or "early"; read at each call
MODES = ("0", "next", "early")
CHUNK = 16384  # bytes per request (the instruction takes multiples of 16)
PER_ROUND = 32  # requests a program issues at once: one per thread of its first warp


@triton.jit
def prefetch_share(next_ptr, next_bytes, program, programs, CHUNK: tl.constexpr = 16384,
                   PER_ROUND: tl.constexpr = 32):
    """Program `program` of `programs` asks L2 for its share (whole CHUNKs, in order) of
    the next_bytes at next_ptr. Only the first warp's lanes issue (the request block is
    replicated across the program's warps)."""
    share = tl.cdiv(tl.cdiv(next_bytes, programs), CHUNK) * CHUNK
    start = program.to(tl.int64) * share
    end = tl.minimum(start + share, next_bytes)
    base = next_ptr.to(tl.pointer_type(tl.int8))
    for first in range(start, end, CHUNK * PER_ROUND):
        offsets = first + tl.arange(0, PER_ROUND).to(tl.int64) * CHUNK
        left = end - offsets
        tl.inline_asm_elementwise(
            "{ .reg .pred p, q; .reg .b32 t; setp.ne.b32 p, $3, 0; mov.u32 t, %tid.x; setp.lt.u32 q, t, 32;"
            " and.pred p, p, q; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r,r", [base + offsets, tl.minimum(tl.maximum(left, 0), CHUNK).to(tl.int32), (left > 0).to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)


def next_weight_args(current: Tensor, next_weight: Tensor | None) -> dict:
    """The launch arguments of a product that asks for `next_weight` ahead (NEXT and the
    pointer and size), or that asks for nothing: off, no next matrix, not Hopper, or a
    matrix the instruction cannot take (16-byte aligned, a multiple of 16 bytes)."""
    if next_weight is None or not usable(current.device):
        return dict(next_ptr=current, next_bytes=0, NEXT=False)
    size = next_weight.numel() * next_weight.element_size()
    if size % 16 or next_weight.data_ptr() % 16:
        return dict(next_ptr=current, next_bytes=0, NEXT=False)
    return dict(next_ptr=next_weight, next_bytes=size, NEXT=True)


def usable(device: torch.device) -> bool:
    if MODE not in MODES:
        raise ValueError(f"RESPEC_L2_AHEAD={MODE!r}: expected one of {', '.join(MODES)}")
    return MODE != "0" and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)

