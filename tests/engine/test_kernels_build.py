"""The Triton kernels compile for an H100 (sm90) here, on the CPU. The other kernel tests
run under Triton's interpreter, which accepts code the compiler rejects (a name bound to a
pointer in one branch and to an integer in the other did), so without this a kernel could
pass every test and fail on its first GPU. With programmatic dependent launch (PDL) every
kernel reads nothing but weights before it waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter without TRITON_INTERPRET (tests/conftest.py sets it for this
# process, and interpreted kernels cannot be compiled).
COMPILE = r"""
import json
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from respec.engine.fast import kernels as K

def types(fn):
    def one(name):
        if name.isupper():
            return "constexpr"
        if name.endswith("_ptr"):
            return {"partial_ptr": "*fp32", "arrivals_ptr": "*i32", "positions_ptr": "*i64",
                    "write_at_ptr": "*i64"}.get(name, "*bf16")
        return "fp32" if name in ("eps", "scale") else "i32"
    return {name: one(name) for name in fn.arg_names}

def read_before_wait(fn, ptx, first_wait):
    # the kernel parameters whose addresses the loads ahead of the first wait read, traced
    # back through the PTX's address arithmetic
    before = ptx[:first_wait]
    defined = {}
    for line in before.splitlines():
        found = re.match(r"\s*(?:@%p\d+\s+)?[\w.]+\s+(%rd\d+),\s*(.*);", line)
        if found:
            defined.setdefault(found.group(1), found.group(2))
    def roots(register, seen):
        if register in seen or register not in defined:
            return set()
        seen.add(register)
        source = defined[register]
        named = re.findall(r"_param_(\d+)\]", source)
        if named:
            return {fn.arg_names[int(index)] for index in named}
        return set().union(*(roots(r, seen) for r in re.findall(r"%rd\d+", source)))
    params = set()
    for line in before.splitlines():
        if "ld.global" in line or "cp.async" in line:
            for register in re.findall(r"\[\s*(%rd\d+)", line):
                params |= roots(register, set())
    return sorted(params)

def build(fn, **constexprs):
    # pointers 16-byte aligned and sizes multiples of 16, as the shapes respec launches are
    # (Triton specializes on it: vectorized and pipelined loads)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name.endswith("_ptr") or name in ("n", "k")}
    ptx = triton.compile(ASTSource(fn=fn, signature=types(fn), constexprs=constexprs, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    first_wait = ptx.find("griddepcontrol.wait")
    return {"waits": ptx.count("griddepcontrol.wait"),
            "read_before_wait": read_before_wait(fn, ptx, first_wait) if first_wait >= 0 else None,
            "loads_before_wait": ptx[:first_wait].count("ld.global") if first_wait >= 0 else None}

report = {}
for gdc, prefetch in ((False, False), (True, False), (True, True)):
    tag = f"{gdc} prefetch={prefetch}"
    for rows, splits in ((1, 1), (1, 4), (16, 1), (16, 4)):
        report[f"gemv {rows} {splits} {tag}"] = build(
            K._gemv, NORM=True, BIAS=True, RESIDUAL=rows == 1, GATED=splits == 1, BLOCK_M=rows, BLOCK_N=16,
            BLOCK_K=128, SPLITS=splits, USE_GDC=gdc, PREFETCH=prefetch)
        report[f"qkv_rope {rows} {splits} {tag}"] = build(
            K._qkv_rope, BIAS=True, HALF=32, BLOCK_M=rows, BLOCK_N=16 if rows > 1 else 4, BLOCK_K=128,
            SPLITS=splits, USE_GDC=gdc, PREFETCH=prefetch)
    if prefetch:
        continue
    for splits in (1, 3):
        report[f"attend {splits} {tag}"] = build(K._attend, SPLITS=splits, BLOCK_Q=16, BLOCK_S=64, DIM=64,
                                                 USE_GDC=gdc)
    report[f"attend_o 14 {tag}"] = build(K._attend_o, BIAS=False, BLOCK_T=16, BLOCK_N=64, BLOCK_S=64, DIM=64,
                                         SPLITS=14, USE_GDC=gdc)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_kernel_compiles_for_sm90_with_and_without_pdl(compiled):
    assert len(compiled) == 2 * (2 * 4 + 2 + 1) + 2 * 4
    for name, ptx in compiled.items():
        assert (ptx["waits"] > 0) == (" True " in name), name


def test_with_pdl_only_weights_are_read_before_the_wait(compiled):
    """With PDL nothing the kernel before writes may be read before the wait: a wait inside
    a software-pipelined loop came after the loop's first read of x, which the pipeliner
    issues ahead of it (triton-lang/triton#11905), and a graphed pass under PDL was wrong
    on an H100. Every kernel waits before its loops; the products prefetching (PREFETCH)
    and attend_o read their weights, and only their weights, ahead of it (traced in the
    PTX to the weight pointer); the others read nothing."""
    for name, ptx in compiled.items():
        if " True " not in name:
            continue
        reads_weights_first = name.endswith("prefetch=True") or name.startswith("attend_o")
        assert ptx["read_before_wait"] == (["w_ptr"] if reads_weights_first else []), name
        assert (ptx["loads_before_wait"] > 0) == reads_weights_first, name
