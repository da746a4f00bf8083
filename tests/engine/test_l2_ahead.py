"""Products asking L2 for a later product's weights (respec/engine/fast/l2_ahead.py). The
request is PTX (Hopper's bulk prefetch) that Triton's interpreter cannot run: it is
compiled for sm90 in test_kernels_build.py and timed on an H100 by bench/kernels_check.py
--l2-ahead. Here: who asks for what, and that it stays off where it cannot run."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture
def l2_ahead():
    pytest.importorskip("triton")
    return importlib.import_module("respec.engine.fast.l2_ahead")


def test_off_by_default_and_never_on_a_cpu(l2_ahead, monkeypatch):
    assert l2_ahead.MODE == "0" or pytest.skip("RESPEC_L2_AHEAD is set in this environment")
    weight, later = torch.zeros(8, 8), torch.zeros(16, 8)
    for mode in ("0", "next", "early"):
        monkeypatch.setattr(l2_ahead, "MODE", mode)
        assert l2_ahead.next_weight_args(weight, later) == dict(next_ptr=weight, next_bytes=0, NEXT=False)


def test_an_unknown_mode_is_refused_by_name(l2_ahead, monkeypatch):
    monkeypatch.setattr(l2_ahead, "MODE", "1")
    with pytest.raises(ValueError, match="RESPEC_L2_AHEAD='1'"):
        l2_ahead.usable(torch.device("cpu"))


def test_which_product_asks_for_which_weights(l2_ahead, monkeypatch):
    from respec.engine.fast.kernel_layer import KernelLayer

    layer = KernelLayer.__new__(KernelLayer)
    o, gate_up, down, following = (torch.zeros(1) for _ in range(4))
    layer.l2_ahead, layer.next_layer_qkv = l2_ahead, following
    expected = {"0": {"qkv": None, "o": None, "gate_up": None, "down": None},
                "next": {"qkv": o, "o": gate_up, "gate_up": down, "down": following},
                "early": {"qkv": gate_up, "o": down, "gate_up": following, "down": None}}
    for mode, asks in expected.items():
        monkeypatch.setattr(l2_ahead, "MODE", mode)
        assert layer._asks_ahead(o, gate_up, down) == asks, mode


def test_on_a_hopper_gpu_the_request_carries_the_matrix_and_its_bytes(l2_ahead, monkeypatch):
    monkeypatch.setattr(l2_ahead, "usable", lambda device: True)
    weight, later = torch.zeros(8, 8), torch.zeros(16, 8, dtype=torch.bfloat16)
    assert l2_ahead.next_weight_args(weight, later) == dict(next_ptr=later, next_bytes=16 * 8 * 2, NEXT=True)
    odd = torch.zeros(7, dtype=torch.bfloat16)  # 14 bytes: not a multiple of 16
    assert l2_ahead.next_weight_args(weight, odd)["NEXT"] is False


def test_each_layer_knows_the_next_layers_qkv_weights(l2_ahead, tiny_model):
    """The last product of a layer may ask for the next layer's first weights; the last
    layer's asks for nothing."""
    from respec.engine.fast.fused import FusedModel

    fused = FusedModel(tiny_model, kernels=True)
    assert len(fused.layers) > 1
    kernel_layers = [layer.kernel_layer for layer in fused.layers]
    assert [k.next_layer_qkv for k in kernel_layers[:-1]] == [layer.qkv_weight for layer in fused.layers[1:]]
    assert kernel_layers[-1].next_layer_qkv is None
