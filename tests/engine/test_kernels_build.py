"""The Triton kernels compile for an H100 (sm90) here, on the CPU. The other kernel tests
run under Triton's interpreter, which accepts code the compiler rejects (a name bound to a
pointer in one branch and to an integer in the other did), so without this a kernel could
pass every test and fail on its first GPU. With programmatic dependent launch (PDL) every
kernel waits before it reads anything (attend_o's weight tile aside)."""

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

def build(fn, **constexprs):
    ptx = triton.compile(ASTSource(fn=fn, signature=types(fn), constexprs=constexprs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    first_wait = ptx.find("griddepcontrol.wait")
    return {"waits": ptx.count("griddepcontrol.wait"),
            "loads_before_wait": ptx[:first_wait].count("ld.global") if first_wait >= 0 else None}

report = {}
for gdc in (False, True):
    for rows, splits in ((1, 1), (1, 4), (16, 1), (16, 4)):
        report[f"gemv {rows} {splits} {gdc}"] = build(
            K._gemv, NORM=True, BIAS=True, RESIDUAL=rows == 1, GATED=splits == 1, BLOCK_M=rows, BLOCK_N=16,
            BLOCK_K=128, SPLITS=splits, USE_GDC=gdc)
        report[f"qkv_rope {rows} {splits} {gdc}"] = build(
            K._qkv_rope, BIAS=True, HALF=32, BLOCK_M=rows, BLOCK_N=16 if rows > 1 else 4, BLOCK_K=128,
            SPLITS=splits, USE_GDC=gdc)
    for splits in (1, 3):
        report[f"attend {splits} {gdc}"] = build(K._attend, SPLITS=splits, BLOCK_Q=16, BLOCK_S=64, DIM=64,
                                                 USE_GDC=gdc)
    report[f"attend_o 14 {gdc}"] = build(K._attend_o, BIAS=False, BLOCK_T=16, BLOCK_N=64, BLOCK_S=64, DIM=64,
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
    assert len(compiled) == 2 * (2 * 4 + 2 + 1)
    for name, ptx in compiled.items():
        assert (ptx["waits"] > 0) == name.endswith("True"), name


def test_with_pdl_nothing_is_read_before_the_wait_but_attend_os_weight_tile(compiled):
    """A wait inside a software-pipelined loop came after the loop's first read of x, which
    the pipeliner issues ahead of it (triton-lang/triton#11905), and a graphed pass under
    PDL was wrong on an H100: every kernel waits before its loops. attend_o loads its one
    weight tile first, outside any loop."""
    for name, ptx in compiled.items():
        if name.endswith("True"):
            assert (ptx["loads_before_wait"] > 0) == name.startswith("attend_o"), name
