"""Triton kernels for a decoder layer over a few tokens (decoding, verification and
drafting at small batch): five kernels per layer instead of the fused path's ~20.

At a few rows a layer's matrix products are matrix-vector products that should run at the
speed of reading the weights; cuBLAS takes 4-7 us for each of them at the 0.5B shape (a
0.5-us read) and the elementwise kernels between them ~2 us each. Here every product is a
GEMV over many programs (a block of output features each, all rows at once, optionally a
share of the inputs) with the work around it folded in: the RMSNorm before it, the bias,
SiLU-and-multiply and the residual add after it; the qkv product also rotates q and k
(RoPE) and writes k and v into the KV store. Attention is one more kernel. Longer passes (the
wide route, kernel_layer.py) take cuBLAS's products, with rope_store and silu_mul doing
what the GEMV kernels fold into theirs, and the same attention kernel. docs/ENGINE.md ("Triton kernels") gives the decisions.

Sums are in float32; each product and the gate are rounded to the activations' dtype where
the PyTorch layer rounds them. On a CPU these run under Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests check them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from respec.engine.fast.tuner import tuned

try:  # grid dependency control: Triton 3.3 on
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

MAX_QUERY_ROWS = 64  # attention's block of query rows: the query heads of a KV head x tokens
# Programmatic dependent launch (Hopper on): each kernel lets the next one start once all
# its programs have their inputs (_inputs_ready), so its launch and ramp overlap the tail of
# the kernel before. Reads of anything a step writes (activations, the KV stores,
# positions, counters, scratch) and every write come after the wait, and the wait comes
# before any loop (_products says why); only attend_o loads its weight tile before it.
# On by default (RESPEC_PDL=0 turns it off): with the wait ahead of every loop a graphed
# pass under PDL equals the eager pass exactly at 1x1, 8x1 and 8x5 tokens, greedy rows are
# the same with and without it, and it took 0.93x the time at batch 1, 0.97-1.01x at 7-56
# rows (H100, fbc8d68, docs/PERFORMANCE.md). With the wait inside the products' loops a
# graphed pass was wrong at 8 rows (b6c4926). Triton's interpreter has no grid dependency
# control, so the CPU tests run without it.
PDL = os.environ.get("RESPEC_PDL", "1") == "1"
# Which kernels launch under PDL when it is on (None: all of them; else names from "gemv",
# "qkv_rope", "attend", "attend_o"); bench/kernels_check.py --pdl turns it on one kernel at
# a time.
PDL_KERNELS: frozenset[str] | None = None
# RESPEC_PDL_PREFETCH=1: with PDL, the products load their first weight tiles before the
# wait and each next tile one iteration ahead (_products). Off by default: it was exact but
# slower at 7-56 rows (1.02-1.14x of no PDL against 0.97-1.01x without it; fbc8d68).
PDL_PREFETCH = os.environ.get("RESPEC_PDL_PREFETCH", "0") == "1"


def _pdl(device: torch.device) -> bool:
    return (PDL and gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _max_rows() -> int:
    rows = int(os.environ.get("RESPEC_KERNEL_ROWS", "64"))
    if rows not in (64, 128, 256):
        raise ValueError(f"RESPEC_KERNEL_ROWS must be 64, 128 or 256, got {rows}")
    return rows


# The most rows (batch x tokens) a layer takes through the GEMV kernels: one row is a
# multiply-and-sum on the CUDA cores, 2-64 one tl.dot on tensor cores (padded to 16, 32 or
# 64 rows: the arithmetic is free, the weights are read once either way; a loop over the
# rows took 1.5-2x as long on an H100). Longer passes take the wide route (cuBLAS products
# and four kernels: kernel_layer.py). 64 since the H100 timing at b9f3ce0 (docs/PERFORMANCE.md,
# "The wide route"): passes of 80-128 tokens took 0.76-0.79x as long through the wide route
# as through 128-row GEMV blocks, passes of 16-64 tokens 1.04-1.11x. RESPEC_KERNEL_ROWS=128
# or 256 sends passes up to that size through the GEMV kernels (before the wide route,
# 65-128 tokens there took 0.80-0.82x PyTorch's layers; 160-256 tokens 0.97-1.05x).
MAX_ROWS = _max_rows()


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, residual_ptr, partial_ptr, arrivals_ptr, rows, n, k, eps,
          NORM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
          USE_GDC: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """out[m, j] = epilogue(sum_i w[j, i] * prologue(x)[m, i]), programs (block of j, split
    of i). GATED: w holds the gate's n rows, then the up projection's n; out = silu(gate) *
    up. With SPLITS > 1 each program sums its share of i and the last of a block to arrive
    adds the shares up and finishes: more programs reading at once where a block of j alone
    would leave SMs idle."""
    block, split = tl.program_id(0), tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    j = block * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, acc_up, squares = _products(x_ptr, w_ptr, norm_ptr, rows, n, k, m, j, j + n, split, NORM, GATED, BLOCK_M,
                                     BLOCK_N, BLOCK_K, SPLITS, USE_GDC, PREFETCH)
    if SPLITS == 1:
        _finish(acc, acc_up, squares, m, j, rows, n, k, eps, out_ptr, bias_ptr, residual_ptr, NORM, BIAS, RESIDUAL,
                GATED)
    else:
        last, acc, acc_up, squares = _add_up_shares(acc, acc_up, squares, partial_ptr, arrivals_ptr, block, split, m,
                                                    rows, BLOCK_M, BLOCK_N, SPLITS, GATED, NORM)
        if last:
            _finish(acc, acc_up, squares, m, j, rows, n, k, eps, out_ptr, bias_ptr, residual_ptr, NORM, BIAS,
                    RESIDUAL, GATED)


@triton.jit
def _products(x_ptr, w_ptr, norm_ptr, rows, n, k, m, j, j_second, split,
              NORM: tl.constexpr, SECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, USE_GDC: tl.constexpr, PREFETCH: tl.constexpr = False):
    """A program's sums over its split of i: (sum_i w[j, i] x[m, i], the same for the
    weight rows j_second if SECOND, the sums of squares of x[m] if NORM) [BLOCK_M,
    BLOCK_N] in float32. RMSNorm's per-row scale multiplies the sums at the end (it is
    constant along i), so the weights stream from the first instruction.

    USE_GDC: wait for the kernel before (PDL above) ahead of the loop, not inside it:
    Triton's software pipeliner issues the loop's first loads, x's among them, in a
    prologue before the loop, so a wait inside it came after a read of x
    (triton-lang/triton#11905; here a graphed pass under PDL gave NaN at 8 rows, b6c4926).
    PREFETCH: each iteration loads the next weight tiles, and the first are loaded before
    the loop and the wait, so with PDL their fetch overlaps the kernel before (what the
    wait inside the loop was for)."""
    m_ok, j_ok = m < rows, j < n
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # the tensor cores' sums, outputs x rows
    acc_up_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    share = tl.cdiv(tl.cdiv(k, SPLITS), BLOCK_K) * BLOCK_K
    first, end = split * share, tl.minimum(k, (split + 1) * share)
    if PREFETCH:
        ws, ws_up = _weight_tiles(w_ptr, j, j_second, j_ok, first, end, k, BLOCK_K, SECOND)
    if USE_GDC:
        _inputs_ready()
    for start in range(first, end, BLOCK_K):
        i = start + tl.arange(0, BLOCK_K)
        i_ok = i < k
        if not PREFETCH:
            ws, ws_up = _weight_tiles(w_ptr, j, j_second, j_ok, start, end, k, BLOCK_K, SECOND)
        if NORM:
            weight = tl.load(norm_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
        if BLOCK_M == 1:  # a 2-D multiply-and-sum (a 3-D broadcast shuffles layouts through shared memory)
            xs = tl.load(x_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
            if NORM:
                squares += tl.sum(xs * xs, axis=0)
                xs = xs * weight
            acc += tl.sum(ws.to(tl.float32) * xs[None, :], axis=1)[None, :]
            if SECOND:
                acc_up += tl.sum(ws_up.to(tl.float32) * xs[None, :], axis=1)[None, :]
        else:  # 2-64 rows, padded to 16-64: tensor cores
            xs = tl.load(x_ptr + m[:, None] * k + i[None, :], mask=m_ok[:, None] & i_ok[None, :], other=0.0)
            if NORM:
                xs = xs.to(tl.float32)
                squares += tl.sum(xs * xs, axis=1)
                xs = xs * weight[None, :]
            # w @ x^T, not x @ w^T: the large weight tile enters the product in the layout it
            # was loaded in, and only the few rows of x are transposed.
            xs_t = tl.trans(xs.to(ws.dtype))
            acc_t += tl.dot(ws, xs_t, out_dtype=tl.float32)
            if SECOND:
                acc_up_t += tl.dot(ws_up, xs_t, out_dtype=tl.float32)
        if PREFETCH:  # the next tiles, for the next iteration
            ws, ws_up = _weight_tiles(w_ptr, j, j_second, j_ok, start + BLOCK_K, end, k, BLOCK_K, SECOND)
    if BLOCK_M > 1:
        acc, acc_up = tl.trans(acc_t), tl.trans(acc_up_t)
    return acc, acc_up, squares


@triton.jit
def _weight_tiles(w_ptr, j, j_second, j_ok, start, end, k, BLOCK_K: tl.constexpr, SECOND: tl.constexpr):
    """The weight rows j (and j_second if SECOND, else j's again) at inputs start to
    start + BLOCK_K, zero from `end` on: [BLOCK_N, BLOCK_K] each."""
    i = start + tl.arange(0, BLOCK_K)
    mask = j_ok[:, None] & (i < end)[None, :]
    ws = tl.load(w_ptr + j[:, None] * k + i[None, :], mask=mask, other=0.0)
    ws_up = ws
    if SECOND:
        ws_up = tl.load(w_ptr + j_second[:, None] * k + i[None, :], mask=mask, other=0.0)
    return ws, ws_up


@triton.jit
def _add_up_shares(acc, acc_up, squares, partial_ptr, arrivals_ptr, block, split, m, rows,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                   SECOND: tl.constexpr = True, SQUARES: tl.constexpr = True):
    """Split-K: each program of a block stores its share of the sums (acc; acc_up if
    SECOND, squares if SQUARES; the rows m < rows: padding rows move nothing); the last to
    arrive gets (True, the sums of every share, in split order: the same sums at every
    replay), the others (False, their own share)."""
    size = 2 * BLOCK_M * BLOCK_N + BLOCK_M
    tile = m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    m_ok = m < rows
    slot = partial_ptr + (block * SPLITS + split) * size
    tl.store(slot + tile, acc, mask=m_ok[:, None])
    if SECOND:
        tl.store(slot + BLOCK_M * BLOCK_N + tile, acc_up, mask=m_ok[:, None])
    if SQUARES:
        tl.store(slot + 2 * BLOCK_M * BLOCK_N + m, squares, mask=m_ok)
    last = _last_to_arrive(arrivals_ptr + block, SPLITS)
    if last:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for other in tl.static_range(SPLITS):
            part = partial_ptr + (block * SPLITS + other) * size
            acc += tl.load(part + tile, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            if SECOND:
                acc_up += tl.load(part + BLOCK_M * BLOCK_N + tile, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
            if SQUARES:
                squares += tl.load(part + 2 * BLOCK_M * BLOCK_N + m, mask=m_ok, other=0.0, cache_modifier=".cg")
    return last, acc, acc_up, squares


@triton.jit
def _inputs_ready():
    """PDL: wait for the kernel before (its writes are visible after), then let the next
    kernel start its own weight fetch. Letting it start only after this wait keeps at most
    one kernel ahead (a trigger at entry would let every later kernel launch and park its
    programs on the SMs)."""
    gdc_wait()
    gdc_launch_dependents()


@triton.jit
def _last_to_arrive(counter_ptr, SPLITS: tl.constexpr):
    """Called by each of SPLITS programs once its share is stored: True for the last to
    arrive, which then resets the counter for the next launch (graph replays too). The
    barrier puts every thread's stores before the count; the count is acquire-release, so
    the last program sees every other program's shares."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == SPLITS - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def _finish(acc, acc_up, squares, m, j, rows, n, k, eps, out_ptr, bias_ptr, residual_ptr,
            NORM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    """The product's epilogue: the norm's scale, bias, SiLU-and-multiply, residual, store."""
    m_ok, j_ok = m < rows, j < n
    dtype = out_ptr.dtype.element_ty
    if NORM:
        scale = 1.0 / tl.sqrt(squares / k + eps)
        acc *= scale[:, None]
        acc_up *= scale[:, None]
    if BIAS:
        acc += tl.load(bias_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + n + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype).to(tl.float32)  # rounded where the PyTorch layer rounds its products
    if GATED:
        out = (out * tl.sigmoid(out)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    offsets = m[:, None] * n + j[None, :]
    out_mask = m_ok[:, None] & j_ok[None, :]
    if RESIDUAL:
        out += tl.load(residual_ptr + offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, out.to(dtype), mask=out_mask)


@triton.jit
def _qkv_rope(x_ptr, w_ptr, norm_ptr, bias_ptr, partial_ptr, arrivals_ptr, cos_ptr, sin_ptr, positions_ptr,
              write_at_ptr, q_ptr, k_store_ptr, v_store_ptr, rows, k, eps, table_rows, tokens_per_row, heads,
              kv_heads, store_row, store_head, store_pos,
              BIAS: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, USE_GDC: tl.constexpr = False,
              PREFETCH: tl.constexpr = False):
    """The attention's input product and what follows it, in one kernel: qkv = RMSNorm(x)
    @ w^T (+ bias), then per head RoPE on the q and k heads, q into q [tokens, heads, D], k
    and v into the KV store at each token's write position. RoPE pairs channel d of a head
    with d + D/2 (HF's rotate_half), so a program takes BLOCK_N channels of a head's first
    half and the BLOCK_N channels D/2 further on (_products' second weight rows), and
    rotates them in its registers. Programs (block, split of i) as _gemv's."""
    block, split = tl.program_id(0), tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    head = block // (HALF // BLOCK_N)
    d = (block % (HALF // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = head * 2 * HALF + d
    n = (heads + 2 * kv_heads) * 2 * HALF
    low, high, squares = _products(x_ptr, w_ptr, norm_ptr, rows, n, k, m, j, j + HALF, split, True, True, BLOCK_M,
                                   BLOCK_N, BLOCK_K, SPLITS, USE_GDC, PREFETCH)
    if SPLITS == 1:
        _rope_finish(low, high, squares, m, d, head, rows, k, eps, bias_ptr, cos_ptr, sin_ptr, positions_ptr,
                     write_at_ptr, q_ptr, k_store_ptr, v_store_ptr, table_rows, tokens_per_row, heads, kv_heads,
                     store_row, store_head, store_pos, BIAS, HALF)
    else:
        last, low, high, squares = _add_up_shares(low, high, squares, partial_ptr, arrivals_ptr, block, split, m,
                                                  rows, BLOCK_M, BLOCK_N, SPLITS)
        if last:
            _rope_finish(low, high, squares, m, d, head, rows, k, eps, bias_ptr, cos_ptr, sin_ptr, positions_ptr,
                         write_at_ptr, q_ptr, k_store_ptr, v_store_ptr, table_rows, tokens_per_row, heads, kv_heads,
                         store_row, store_head, store_pos, BIAS, HALF)


@triton.jit
def _rope_finish(low, high, squares, m, d, head, rows, k, eps, bias_ptr, cos_ptr, sin_ptr, positions_ptr,
                 write_at_ptr, q_ptr, k_store_ptr, v_store_ptr, table_rows, tokens_per_row, heads, kv_heads,
                 store_row, store_head, store_pos, BIAS: tl.constexpr, HALF: tl.constexpr):
    """_qkv_rope's epilogue for channels d and d + HALF of one head: the norm's scale, the
    bias, the product rounded where the PyTorch layer rounds it; then _rotate_store."""
    m_ok = m < rows
    dtype = q_ptr.dtype.element_ty
    scale = 1.0 / tl.sqrt(squares / k + eps)
    low *= scale[:, None]
    high *= scale[:, None]
    if BIAS:
        low += tl.load(bias_ptr + head * 2 * HALF + d).to(tl.float32)[None, :]
        high += tl.load(bias_ptr + head * 2 * HALF + HALF + d).to(tl.float32)[None, :]
    low, high = low.to(dtype).to(tl.float32), high.to(dtype).to(tl.float32)
    _rotate_store(low, high, m, m_ok, d, head, cos_ptr, sin_ptr, positions_ptr, write_at_ptr, q_ptr, k_store_ptr,
                  v_store_ptr, table_rows, tokens_per_row, heads, kv_heads, store_row, store_head, store_pos, HALF)


@triton.jit
def _rotate_store(low, high, m, m_ok, d, head, cos_ptr, sin_ptr, positions_ptr, write_at_ptr, q_ptr, k_store_ptr,
                  v_store_ptr, table_rows, tokens_per_row, heads, kv_heads, store_row, store_head, store_pos,
                  HALF: tl.constexpr):
    """Channels d and d + HALF of head `head` for tokens m (float32, already rounded as the
    product): a q or k head is rotated, x cos + swap(x) sin' (sin' carries rotate_half's
    sign; cos and sin' read from the tables at each token's position, past their end their
    last row: rows that are done keep stepping), each product rounded as the PyTorch layer
    rounds it; then q goes to q [tokens, heads, D], k and v into the KV stores at each
    token's write slot."""
    dtype = q_ptr.dtype.element_ty
    if head < heads + kv_heads:  # q or k: rotate
        position = tl.minimum(tl.load(positions_ptr + m, mask=m_ok, other=0), table_rows - 1)
        table = position[:, None] * 2 * HALF + d[None, :]
        cos_low, cos_high = tl.load(cos_ptr + table).to(tl.float32), tl.load(cos_ptr + table + HALF).to(tl.float32)
        sin_low, sin_high = tl.load(sin_ptr + table).to(tl.float32), tl.load(sin_ptr + table + HALF).to(tl.float32)
        new_low = (low * cos_low).to(dtype).to(tl.float32) + (high * sin_low).to(dtype).to(tl.float32)
        new_high = (high * cos_high).to(dtype).to(tl.float32) + (low * sin_high).to(dtype).to(tl.float32)
        low, high = new_low, new_high
    if head < heads:
        q_at = q_ptr + (m[:, None] * heads + head) * 2 * HALF + d[None, :]
        tl.store(q_at, low.to(dtype), mask=m_ok[:, None])
        tl.store(q_at + HALF, high.to(dtype), mask=m_ok[:, None])
    else:
        slot = tl.load(write_at_ptr + m, mask=m_ok, other=0)
        store = (m // tokens_per_row) * store_row + ((head - heads) % kv_heads) * store_head + slot * store_pos
        store_at = store[:, None] + d[None, :]
        if head < heads + kv_heads:
            tl.store(k_store_ptr + store_at, low.to(dtype), mask=m_ok[:, None])
            tl.store(k_store_ptr + store_at + HALF, high.to(dtype), mask=m_ok[:, None])
        else:
            tl.store(v_store_ptr + store_at, low.to(dtype), mask=m_ok[:, None])
            tl.store(v_store_ptr + store_at + HALF, high.to(dtype), mask=m_ok[:, None])


@triton.jit
def _rope_store(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, write_at_ptr, q_ptr, k_store_ptr, v_store_ptr, tokens,
                table_rows, tokens_per_row, heads, kv_heads, store_row, store_head, store_pos,
                HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """What follows a qkv product computed elsewhere (cuBLAS, on the long passes):
    programs (block of tokens, head) rotate and store as _qkv_rope's epilogue does."""
    block, head = tl.program_id(0), tl.program_id(1)
    m = block * BLOCK_T + tl.arange(0, BLOCK_T)
    m_ok = m < tokens
    d = tl.arange(0, HALF)
    at = qkv_ptr + m[:, None] * (heads + 2 * kv_heads) * 2 * HALF + head * 2 * HALF + d[None, :]
    low = tl.load(at, mask=m_ok[:, None], other=0.0).to(tl.float32)
    high = tl.load(at + HALF, mask=m_ok[:, None], other=0.0).to(tl.float32)
    _rotate_store(low, high, m, m_ok, d, head, cos_ptr, sin_ptr, positions_ptr, write_at_ptr, q_ptr, k_store_ptr,
                  v_store_ptr, table_rows, tokens_per_row, heads, kv_heads, store_row, store_head, store_pos, HALF)


@triton.jit
def _silu_mul(x_ptr, out_ptr, total, n, BLOCK: tl.constexpr):
    """out [tokens, n] = silu(gate) * up from x [tokens, 2n] (gate, then up), each
    rounded where the PyTorch layer rounds it (as _finish's GATED)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < total
    at = x_ptr + (offsets // n) * 2 * n + offsets % n
    gate = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(at + n, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up
    tl.store(out_ptr + offsets, out.to(dtype), mask=ok)


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, positions_ptr, out_ptr, partial_ptr, arrivals_ptr, tokens_per_row, heads, kv_heads,
            keys, scale, store_row, store_head, store_pos,
            SPLITS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, DIM: tl.constexpr,
            USE_GDC: tl.constexpr = False):
    """Programs (row x KV head, split of the keys). A program takes the query heads sharing
    its KV head, for every token of the row, as one block of group x T query rows (query
    row member * T + t; padded to 16 for tl.dot) against one block of BLOCK_S keys; a token
    at position p sees the keys at positions <= p (fused.PassInputs), and keys past the
    row's last position are never read. softmax(q k^T scale) v over the visible keys, both
    products on tensor cores. Its partial result (max, sum, weighted values) goes to
    `partial`; the last program of a (row, KV head) to arrive combines them (split-K
    attention in one kernel: a loop over the keys in one program took 8 us on an H100)."""
    if USE_GDC:  # every input is the step's own: wait first
        _inputs_ready()
    program, split = tl.program_id(0), tl.program_id(1)
    row, kv_head = program // kv_heads, program % kv_heads
    group = heads // kv_heads
    r = tl.arange(0, BLOCK_Q)
    member, t = r // tokens_per_row, r % tokens_per_row
    r_ok = r < group * tokens_per_row
    d = tl.arange(0, DIM)
    q_rows = ((row * tokens_per_row + t) * heads + kv_head * group + member) * DIM
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=r_ok[:, None], other=0.0)
    last = tl.load(positions_ptr + row * tokens_per_row + t, mask=r_ok, other=-1)  # each query row's position
    s = split * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = (s < keys) & (s <= tl.max(last, axis=0))  # a key no token of the row sees is not read
    store = row * store_row + kv_head * store_head
    k = tl.load(k_ptr + store + s[:, None] * store_pos + d[None, :], mask=s_ok[:, None], other=0.0)
    v = tl.load(v_ptr + store + s[:, None] * store_pos + d[None, :], mask=s_ok[:, None], other=0.0)
    visible = s_ok[None, :] & (s[None, :] <= last[:, None])
    scores = tl.where(visible, tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale, float("-inf"))
    best = tl.maximum(tl.max(scores, axis=1), -1.0e30)  # finite: a fully masked block adds exp(-inf) = 0
    weights = tl.exp(scores - best[:, None])
    total = tl.sum(weights, axis=1)
    acc = tl.dot(weights.to(v.dtype), v, out_dtype=tl.float32)
    out_offsets = q_rows[:, None] + d[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + out_offsets, (acc / tl.maximum(total, 1.0e-30)[:, None]).to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None])
    else:
        slot = partial_ptr + (program * SPLITS + split) * BLOCK_Q * (DIM + 2)
        tl.store(slot + r[:, None] * DIM + d[None, :], acc)
        tl.store(slot + BLOCK_Q * DIM + r, best)
        tl.store(slot + BLOCK_Q * DIM + BLOCK_Q + r, total)
        if _last_to_arrive(arrivals_ptr + program, SPLITS):  # combine every split's partial
            first = partial_ptr + program * SPLITS * BLOCK_Q * (DIM + 2)
            overall = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
            for other in tl.static_range(SPLITS):
                part = first + other * BLOCK_Q * (DIM + 2)
                overall = tl.maximum(overall, tl.load(part + BLOCK_Q * DIM + r, cache_modifier=".cg"))
            summed = tl.zeros([BLOCK_Q, DIM], dtype=tl.float32)
            norm = tl.zeros([BLOCK_Q], dtype=tl.float32)
            for other in tl.static_range(SPLITS):
                part = first + other * BLOCK_Q * (DIM + 2)
                factor = tl.exp(tl.load(part + BLOCK_Q * DIM + r, cache_modifier=".cg") - overall)
                summed += tl.load(part + r[:, None] * DIM + d[None, :], cache_modifier=".cg") * factor[:, None]
                norm += tl.load(part + BLOCK_Q * DIM + BLOCK_Q + r, cache_modifier=".cg") * factor
            tl.store(out_ptr + out_offsets, (summed / tl.maximum(norm, 1.0e-30)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=r_ok[:, None])


@triton.jit
def _attend_o(q_ptr, k_ptr, v_ptr, positions_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, arrivals_ptr,
              tokens, heads, kv_heads, keys, n, scale, store_head, store_pos,
              BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
              DIM: tl.constexpr, SPLITS: tl.constexpr, USE_GDC: tl.constexpr = False):
    """One row's attention and the output product after it, in one kernel: out[t, j] =
    residual[t, j] (+ bias[j]) + sum over heads h of w[j, h*D:(h+1)*D] . attention_h(t).
    Programs (block of output features j, query head h): each attends its head's queries
    (the row's T tokens, padded to BLOCK_T for tl.dot) over the keys up to each token's
    position, in blocks of BLOCK_S with a running softmax, rounds the result as the
    two-kernel path stores it, and multiplies it by its D columns of w; the heads' shares
    are added up in head order by the last to arrive (_add_up_shares). Each head's
    attention is computed once per block of j (the keys come from L2 after the first), and
    the attention kernel's launch, its share-combining and its round trip of the output
    through memory are gone: at a few dozen keys those cost more than the arithmetic."""
    block, head = tl.program_id(0), tl.program_id(1)
    t, d = tl.arange(0, BLOCK_T), tl.arange(0, DIM)
    j = block * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok, j_ok = t < tokens, j < n
    w = tl.load(w_ptr + j[:, None] * (heads * DIM) + head * DIM + d[None, :], mask=j_ok[:, None], other=0.0)
    if USE_GDC:  # the weights are in flight; everything else is the step's own
        _inputs_ready()
    q = tl.load(q_ptr + (t[:, None] * heads + head) * DIM + d[None, :], mask=t_ok[:, None], other=0.0)
    last = tl.load(positions_ptr + t, mask=t_ok, other=-1)  # each token's position: it sees keys up to it
    store = (head // (heads // kv_heads)) * store_head
    best = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)  # finite: a fully masked block adds exp(-inf) = 0
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, DIM], dtype=tl.float32)
    for start in range(0, tl.minimum(tl.max(last, axis=0) + 1, keys), BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < keys
        k = tl.load(k_ptr + store + s[:, None] * store_pos + d[None, :], mask=s_ok[:, None], other=0.0)
        v = tl.load(v_ptr + store + s[:, None] * store_pos + d[None, :], mask=s_ok[:, None], other=0.0)
        visible = s_ok[None, :] & (s[None, :] <= last[:, None])
        scores = tl.where(visible, tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])
        factor = tl.exp(best - new_best)
        total = total * factor + tl.sum(weights, axis=1)
        acc = acc * factor[:, None] + tl.dot(weights.to(v.dtype), v, out_dtype=tl.float32)
        best = new_best
    attended = (acc / tl.maximum(total, 1.0e-30)[:, None]).to(out_ptr.dtype.element_ty)
    product = tl.trans(tl.dot(w, tl.trans(attended.to(w.dtype)), out_dtype=tl.float32))  # [BLOCK_T, BLOCK_N]
    unused = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    no_squares = tl.zeros([BLOCK_T], dtype=tl.float32)
    last_in, product, unused, no_squares = _add_up_shares(product, unused, no_squares, partial_ptr, arrivals_ptr,
                                                          block, head, t, tokens, BLOCK_T, BLOCK_N, SPLITS, False,
                                                          False)
    if last_in:
        _finish(product, unused, no_squares, t, j, tokens, n, heads * DIM, 0.0, out_ptr, bias_ptr, residual_ptr,
                False, BIAS, True, False)


def _block_n(n: int, block_m: int) -> int:
    """Output features per program: enough programs (~256) to keep every SM reading."""
    block = 4
    while block < 64 and n // (block * 2) >= 256:
        block *= 2
    return block if block_m == 1 else max(block, 16)


# (BLOCK_N, BLOCK_K, warps, splits of k) tried per product on the GPU (one row; 2-16 rows),
# timed on first use; the fastest is kept per shape (tuner.tuned).
CANDIDATES = {1: ((1, 1024, 2, 1), (2, 1024, 4, 1), (2, 2048, 8, 1), (4, 512, 4, 1), (4, 1024, 4, 1),
                  (8, 512, 4, 1), (8, 1024, 8, 1), (16, 256, 4, 1), (4, 512, 4, 2), (8, 512, 4, 2),
                  (8, 256, 4, 4), (16, 256, 4, 4)),
              16: ((16, 128, 4, 1), (32, 128, 4, 1), (16, 128, 4, 4), (16, 128, 4, 8), (16, 256, 4, 4),
                   (32, 128, 4, 4), (32, 128, 4, 8), (64, 64, 4, 8), (16, 64, 4, 16))}
# At 32-64 rows each program's x tile ([rows, BLOCK_K]) outweighs a 16-feature weight tile 2-4:1,
# and every program reads it: wider blocks of features read it fewer times. Added at b9f3ce0
# (64 rows) and after it (32): decode at 64 rows then took 1.148 ms against 1.306 ms before, in
# one profile each (docs/PERFORMANCE.md, "The wide route"); the tuner decides per shape.
CANDIDATES[32] = CANDIDATES[64] = ((16, 128, 4, 1), (32, 128, 4, 1), (16, 128, 4, 4), (32, 128, 4, 4), (16, 64, 4, 8),
                                   (64, 64, 4, 1), (64, 128, 8, 1), (32, 64, 4, 2), (64, 64, 8, 2))
# Blocks past 64 rows: more warps and smaller k tiles for the larger blocks of rows
CANDIDATES[128] = ((16, 128, 4, 1), (16, 64, 8, 1), (32, 64, 8, 1), (16, 128, 8, 4), (16, 64, 4, 8))
CANDIDATES[256] = ((16, 64, 8, 1), (16, 32, 8, 1), (32, 32, 8, 1), (16, 64, 8, 4), (16, 32, 8, 8))
ATTENTION_CANDIDATES = ((16, 4), (32, 4), (64, 4), (128, 4), (128, 8))  # (keys per program, warps)
ATTEND_O_CANDIDATES = ((16, 64, 4), (32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8))  # (outputs,
# keys per block, warps)
ATTEND_O_MAX_TOKENS = 16  # a row's tokens attend_o takes: decoding and verifying up to 15 drafts
ATTEND_O_MAX_KEYS = 2048  # stores longer than this keep the attention kernel: every block of
# outputs attends again, so the fused kernel reads a row's keys once per block (from L2)
# Passes of one row through attend_o: opt-in (RESPEC_ATTEND_O=1), since its time alone is not
# yet measured (one H100 run timed it only together with a fused MLP kernel, and the pair was
# slower: docs/PERFORMANCE.md). Read at each call, so bench/kernels_check.py times both ways
# in one process.
ATTEND_O = os.environ.get("RESPEC_ATTEND_O", "0") == "1"


def _block_m(rows: int) -> int:
    """Rows a product's program holds: one (a multiply-and-sum), or more padded to 16, 32,
    64 (... MAX_ROWS) for tl.dot."""
    return 1 if rows == 1 else max(16, triton.next_power_of_2(rows))


def _split_scratch(x: Tensor, blocks: int, splits: int, block_m: int, block_n: int) -> Tensor:
    """Where the programs of a split product leave their shares for _add_up_shares: per
    program two [block_m, block_n] sums and block_m sums of squares (unsplit: nothing)."""
    size = blocks * splits * (2 * block_m * block_n + block_m) if splits > 1 else 1
    return x.new_empty(size, dtype=torch.float32)


def gemv(x: Tensor, weight: Tensor, out_features: int, norm: tuple[Tensor, float] | None = None,
         bias: Tensor | None = None, residual: Tensor | None = None, gated: bool = False,
         config: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [rows, k] -> [rows, out_features]: (RMSNorm(x) if norm) @ weight.T (+ bias), then
    silu(gate) * up if gated (weight stacks gate and up), then (+ residual). `config`
    (BLOCK_N, BLOCK_K, warps, splits) overrides the tuned choice (the tests use it)."""
    rows, k = x.shape
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("gemv reads x and weight as row-major: pass contiguous tensors")
    out = x.new_empty(rows, out_features)
    block_m = _block_m(rows)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    flags = dict(NORM=norm is not None, BIAS=bias is not None, RESIDUAL=residual is not None, GATED=gated,
                 BLOCK_M=block_m)
    tensors = (x, weight, out, norm_weight, bias if bias is not None else x, residual if residual is not None else x)

    def launch(config: tuple[int, int, int, int]) -> None:
        block_n, block_k, warps, splits = config
        blocks = triton.cdiv(out_features, block_n)
        partial = _split_scratch(x, blocks, splits, block_m, block_n)
        _gemv[(blocks, splits)](*tensors, partial, _arrivals(x.device, blocks), rows, out_features, k, eps, **flags,
                                BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)), SPLITS=splits,
                                num_warps=warps, **_pdl_launch(x.device, "gemv"))

    if config is not None:
        launch(config)
        return out
    heuristic = (_block_n(out_features, block_m), 512 if block_m == 1 else 128, 4, 1)
    launch(tuned(launch, ("gemv", out_features, k, *flags.values()), x, heuristic, CANDIDATES[block_m]))
    return out


def qkv_rope(x: Tensor, weight: Tensor, norm: tuple[Tensor, float], bias: Tensor | None, cos: Tensor,
             signed_sin: Tensor, positions: Tensor, write_at: Tensor, k_store: Tensor, v_store: Tensor, heads: int,
             kv_heads: int, config: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [tokens, hidden] -> rotated q [tokens, heads, D], with RMSNorm(x) @ weight.T (+ bias)
    as the qkv product (weight stacks q, k and v); rotated k and v written into the layer's
    stores [rows, kv_heads, S, D] at write_at [rows, T]. cos and signed_sin are the RoPE
    tables [positions, D] (fused.RopeTable), read at positions [rows, T]. `config` as gemv's
    (BLOCK_N must divide D/2)."""
    rows, k = x.shape
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("qkv_rope reads x and weight as row-major: pass contiguous tensors")
    dim = k_store.shape[-1]
    half, n = dim // 2, weight.shape[0]
    q = x.new_empty(rows, heads, dim)
    block_m = _block_m(rows)
    positions, write_at = positions.contiguous(), write_at.contiguous()

    def launch(config: tuple[int, int, int, int]) -> None:
        block_n, block_k, warps, splits = config
        blocks = (heads + 2 * kv_heads) * (half // block_n)
        partial = _split_scratch(x, blocks, splits, block_m, block_n)
        _qkv_rope[(blocks, splits)](
            x, weight, norm[0], bias if bias is not None else x, partial, _arrivals(x.device, blocks), cos, signed_sin,
            positions, write_at, q, k_store, v_store, rows, k, norm[1], cos.shape[0], positions.shape[1], heads,
            kv_heads, k_store.stride(0), k_store.stride(1), k_store.stride(2),
            BIAS=bias is not None, HALF=half, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=min(block_k, triton.next_power_of_2(k)), SPLITS=splits, num_warps=warps, **_pdl_launch(x.device, "qkv_rope"))

    if config is not None:
        launch(config)
        return q
    heuristic = (min(_block_n(n // 2, block_m), half), 512 if block_m == 1 else 128, 4, 1)
    candidates = tuple(c for c in CANDIDATES[block_m] if half % c[0] == 0)
    launch(tuned(launch, ("qkv_rope", n, k, heads, kv_heads, dim, bias is not None, block_m), x, heuristic,
                  candidates))
    return q


def attend(q: Tensor, k_store: Tensor, v_store: Tensor, positions: Tensor, tokens_per_row: int) -> Tensor:
    """q [tokens, heads, D] against the layer's stores [rows, kv_heads, S, D], the token at
    positions [rows, T] seeing the keys at positions up to its own -> [tokens, heads * D]."""
    tokens, heads, dim = q.shape
    rows = tokens // tokens_per_row
    kv_heads, keys = k_store.shape[1], k_store.shape[2]
    out = q.new_empty(tokens, heads * dim)
    positions = positions.contiguous()
    block_q = max(16, triton.next_power_of_2(heads // kv_heads * tokens_per_row))
    arrivals = _arrivals(q.device, rows * kv_heads)

    def launch(config: tuple[int, int]) -> None:
        block_s, warps = config
        splits = triton.cdiv(keys, block_s)
        partial = torch.empty(rows * kv_heads * splits * block_q * (dim + 2), dtype=torch.float32, device=q.device)
        _attend[(rows * kv_heads, splits)](
            q, k_store, v_store, positions, out, partial, arrivals, tokens_per_row, heads, kv_heads, keys, dim**-0.5,
            k_store.stride(0), k_store.stride(1), k_store.stride(2),
            SPLITS=splits, BLOCK_Q=block_q, BLOCK_S=block_s, DIM=dim, num_warps=warps, **_pdl_launch(q.device, "attend"),
        )

    launch(tuned(launch, ("attend", rows, heads, kv_heads, keys, dim, block_q), q, (64, 4), ATTENTION_CANDIDATES))
    return out


def rope_store(qkv: Tensor, cos: Tensor, signed_sin: Tensor, positions: Tensor, write_at: Tensor, k_store: Tensor,
               v_store: Tensor, heads: int, kv_heads: int) -> Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * D] (the product, bias added) -> rotated q
    [tokens, heads, D]; rotated k and v written into the layer's stores at write_at, as
    qkv_rope does after its product (the same tables, positions and stores)."""
    tokens = qkv.shape[0]
    dim = k_store.shape[-1]
    if not qkv.is_contiguous() or qkv.shape[1] != (heads + 2 * kv_heads) * dim or dim & (dim - 1):
        raise ValueError(f"rope_store takes a contiguous [tokens, {(heads + 2 * kv_heads) * dim}] qkv and a power-of-two "
                         f"head size, got {tuple(qkv.shape)} and {dim}")
    q = qkv.new_empty(tokens, heads, dim)
    positions, write_at = positions.contiguous(), write_at.contiguous()
    block_t = 16
    _rope_store[(triton.cdiv(tokens, block_t), heads + 2 * kv_heads)](
        qkv, cos, signed_sin, positions, write_at, q, k_store, v_store, tokens, cos.shape[0], positions.shape[1],
        heads, kv_heads, k_store.stride(0), k_store.stride(1), k_store.stride(2), HALF=dim // 2, BLOCK_T=block_t)
    return q


def silu_mul(gate_up: Tensor) -> Tensor:
    """[tokens, 2n] (gate, then up) -> silu(gate) * up [tokens, n], in one kernel."""
    tokens, width = gate_up.shape
    if not gate_up.is_contiguous() or width % 2:
        raise ValueError(f"silu_mul takes a contiguous [tokens, 2n], got {tuple(gate_up.shape)}")
    out = gate_up.new_empty(tokens, width // 2)
    block = 1024
    _silu_mul[(triton.cdiv(out.numel(), block),)](gate_up, out, out.numel(), width // 2, BLOCK=block)
    return out


def attend_o(q: Tensor, k_store: Tensor, v_store: Tensor, positions: Tensor, weight: Tensor, bias: Tensor | None,
             residual: Tensor, config: tuple[int, int, int] | None = None) -> Tensor:
    """One row's pass: q [T, heads, D] against the stores' first row [rows, kv_heads, S, D]
    (the token at positions [1, T] seeing the keys at positions up to its own), then the
    output product: -> residual + attention @ weight.T (+ bias), [T, out features].
    `config` (BLOCK_N, BLOCK_S, warps) overrides the tuned choice (the tests use it)."""
    tokens, heads, dim = q.shape
    if positions.shape != (1, tokens) or tokens > ATTEND_O_MAX_TOKENS:
        raise ValueError(f"attend_o takes one row of at most {ATTEND_O_MAX_TOKENS} tokens, "
                         f"got positions {tuple(positions.shape)} for {tokens} tokens")
    n = weight.shape[0]
    kv_heads, keys = k_store.shape[1], k_store.shape[2]
    out = residual.new_empty(tokens, n)
    positions = positions.contiguous()
    block_t = max(16, triton.next_power_of_2(tokens))
    tensors = (q, k_store, v_store, positions, weight, bias if bias is not None else residual, residual, out)

    def launch(config: tuple[int, int, int]) -> None:
        block_n, block_s, warps = config
        blocks = triton.cdiv(n, block_n)
        _attend_o[(blocks, heads)](
            *tensors, _split_scratch(q, blocks, heads, block_t, block_n), _arrivals(q.device, blocks), tokens, heads,
            kv_heads, keys, n, dim**-0.5, k_store.stride(1), k_store.stride(2),
            BIAS=bias is not None, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_S=block_s, DIM=dim, SPLITS=heads,
            num_warps=warps, **_pdl_launch(q.device, "attend_o"))

    if config is not None:
        launch(config)
        return out
    key = ("attend_o", tokens, heads, kv_heads, keys, dim, n, bias is not None)
    launch(tuned(launch, key, q, (64, 64, 4), ATTEND_O_CANDIDATES))
    return out


def _pdl_launch(device: torch.device, kernel: str) -> dict:
    """The kernels' PDL arguments: none where it is off (the CPU's interpreter among them)
    or where PDL_KERNELS leaves this kernel out; the products also prefetch their first
    weight tiles before the wait where PDL_PREFETCH says so."""
    if not (_pdl(device) and (PDL_KERNELS is None or kernel in PDL_KERNELS)):
        return {}
    return dict(USE_GDC=True, launch_pdl=True, **({"PREFETCH": PDL_PREFETCH} if kernel in PRODUCTS else {}))


PRODUCTS = ("gemv", "qkv_rope")  # the kernels whose loop streams weights (_products)


ARRIVAL_COUNTERS = 1 << 16
_arrival_counts: dict[torch.device, Tensor] = {}


def _arrivals(device: torch.device, programs: int) -> Tensor:
    """Zeroed int32 counters, one per block of work whose programs share out a sum, that
    outlive every launch: the last program of a block to arrive resets its counter, so no
    launch (or graph replay) clears them. One buffer per device, allocated once (a graph
    keeps its address): kernels on one stream use it one after another."""
    if programs > ARRIVAL_COUNTERS:
        raise ValueError(f"{programs} blocks of split work in one launch: more than {ARRIVAL_COUNTERS} counters")
    counts = _arrival_counts.get(device)
    if counts is None:
        counts = _arrival_counts[device] = torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=device)
    return counts
