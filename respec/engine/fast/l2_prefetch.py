"""Asking the GPU's L2 cache to fetch a layer's weights before its kernels read them
(Hopper on; opt-in, RESPEC_L2_PREFETCH).

At batch 1 a layer's five kernels read ~30 MB of weights at the 0.5B shape, ~10 us at the
speed of memory, but take ~25 us: between kernels, and while the small products and
attention ramp up, memory sits idle. One tiny kernel at the start of the layer asks L2 to
fetch the weights the layer's products will read (Hopper's bulk prefetch,
`cp.async.bulk.prefetch.L2`: one instruction fetches a chunk, with no registers or shared
memory held while it lands), so memory streams them in while the products before them
run, and the products then read from L2. Under PDL it starts while the layer before is
still running. It changes no value anywhere: a prefetch is a hint, and the products read
what they read either way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from respec.engine.fast.kernels import _inputs_ready, _pdl_launch

# "0": off; "1": the output, gate-up and down products' weights; "all": the qkv weights too
# (read first, so fetched only as far ahead as PDL starts this kernel).
MODE = os.environ.get("RESPEC_L2_PREFETCH", "0")
CHUNK = 16384  # bytes one bulk prefetch asks for (a multiple of 16, as the instruction needs)
PER_PROGRAM = 32  # chunks a one-warp program asks for: one per thread


@triton.jit
def _prefetch_l2(table_ptr, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr, USE_GDC: tl.constexpr = False):
    """Programs (tensor, part): each thread asks L2 for one CHUNK of the tensor at
    table[tensor] = (address, bytes), int64; parts past a tensor's end ask for nothing.
    Under PDL it then waits for the kernel before, so the kernel after, which waits for
    this one, still comes after everything before it."""
    entry, part = tl.program_id(0), tl.program_id(1)
    address = tl.load(table_ptr + 2 * entry)
    size = tl.load(table_ptr + 2 * entry + 1)
    offsets = (part * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    left = size - offsets
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r,r", [address + offsets, tl.minimum(tl.maximum(left, 0), CHUNK).to(tl.int32), (left > 0).to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)
    if USE_GDC:
        _inputs_ready()


def usable(device: torch.device) -> bool:
    """Bulk prefetch is Hopper's (compute capability 9.0 on), and PTX: not on a CPU."""
    return MODE != "0" and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


class WeightPrefetch:
    """One layer's prefetch: the table of its weights' addresses and sizes on the device,
    built once outside graph capture (weights are updated in place, so their addresses
    hold; if they ever move the table is rebuilt, and during a capture that is an error,
    since the graph would keep reading the old weights anyway)."""

    def __init__(self) -> None:
        self.addresses: tuple[int, ...] = ()
        self.table: Tensor | None = None
        self.largest = 0

    def __call__(self, weights: tuple[Tensor, ...]) -> None:
        addresses = tuple(w.data_ptr() for w in weights)
        if addresses != self.addresses:
            self._build(weights, addresses)
        parts = triton.cdiv(self.largest, CHUNK * PER_PROGRAM)
        _prefetch_l2[(len(weights), parts)](self.table, CHUNK=CHUNK, PER_PROGRAM=PER_PROGRAM, num_warps=1,
                                            **_pdl_launch(weights[0].device, "prefetch_l2"))

    def _build(self, weights: tuple[Tensor, ...], addresses: tuple[int, ...]) -> None:
        if weights[0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a layer's weights moved since its prefetch table was built, during graph capture")
        sizes = [w.numel() * w.element_size() for w in weights]
        if any(a % 16 or s % 16 for a, s in zip(addresses, sizes, strict=True)):
            raise ValueError("bulk prefetch needs 16-byte aligned weights of a multiple of 16 bytes")
        self.table = torch.tensor([[a, s] for a, s in zip(addresses, sizes, strict=True)], dtype=torch.int64,
                                  device=weights[0].device)
        self.addresses, self.largest = addresses, max(sizes)
