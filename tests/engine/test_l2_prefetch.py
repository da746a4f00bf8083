"""The layers' L2 weight prefetch (respec/engine/fast/l2_prefetch.py). Its kernel is PTX
(Hopper's bulk prefetch), which Triton's interpreter cannot run: it is compiled for sm90 in
test_kernels_build.py and timed and checked on an H100 by bench/kernels_check.py --l2.
Here: what it is asked to fetch, and that it stays off where it cannot run."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture
def l2_prefetch():
    pytest.importorskip("triton")
    return importlib.import_module("respec.engine.fast.l2_prefetch")


def test_the_table_lists_each_weight_address_and_size_in_bytes(l2_prefetch):
    weights = (torch.zeros(24, 16, dtype=torch.bfloat16), torch.zeros(8, 32))
    prefetch = l2_prefetch.WeightPrefetch()
    prefetch._build(weights, tuple(w.data_ptr() for w in weights))
    assert prefetch.table.tolist() == [[weights[0].data_ptr(), 24 * 16 * 2], [weights[1].data_ptr(), 8 * 32 * 4]]
    assert prefetch.largest == 8 * 32 * 4


def test_weights_the_bulk_prefetch_cannot_take_are_refused(l2_prefetch):
    """The instruction needs 16-byte aligned addresses and sizes in multiples of 16."""
    odd = torch.zeros(7, dtype=torch.bfloat16)  # 14 bytes
    with pytest.raises(ValueError, match="16-byte"):
        l2_prefetch.WeightPrefetch()._build((odd,), (odd.data_ptr(),))


def test_it_is_off_by_default_and_never_on_a_cpu(l2_prefetch, monkeypatch):
    assert l2_prefetch.MODE == "0" or pytest.skip("RESPEC_L2_PREFETCH is set in this environment")
    assert not l2_prefetch.usable(torch.device("cpu"))
    monkeypatch.setattr(l2_prefetch, "MODE", "all")
    assert not l2_prefetch.usable(torch.device("cpu"))
