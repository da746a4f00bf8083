"""The oneDNN inference path of respec's Linear: same products as F.linear (to float32
rounding), untouched training pass, never a stale packed weight, batch-independent rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from respec.engine import cpu_linear
from respec.engine.cpu_linear import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


def layer(bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(64, 96, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_inference_products_equal_f_linear(bias):
    linear, x = layer(bias), torch.randn(3, 7, 64)
    with torch.no_grad():
        out = linear(x)
    assert linear._packed is not None  # 21 rows: the oneDNN path ran
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_few_rows_and_the_training_pass_use_f_linear_exactly():
    linear = layer()
    few = torch.randn(1, cpu_linear.MIN_ROWS - 1, 64)
    with torch.no_grad():
        assert torch.equal(linear(few), F.linear(few, linear.weight, linear.bias))
    many = torch.randn(4, 16, 64)
    out = linear(many)  # grad enabled: autograd's F.linear
    assert torch.equal(out, F.linear(many, linear.weight, linear.bias))
    out.sum().backward()
    assert linear.weight.grad is not None and linear._packed is None


def test_an_updated_weight_is_repacked():
    linear, x = layer(), torch.randn(32, 64)
    with torch.no_grad():
        linear(x)
        linear.weight.mul_(-2.0)  # in place, as an optimizer step or a weight load does
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        linear.weight = torch.nn.Parameter(torch.randn(96, 64))  # a new tensor
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_a_layer_that_served_a_batch_can_be_deep_copied_and_pickled():
    import copy
    import pickle

    linear, x = layer(), torch.randn(32, 64)
    with torch.no_grad():
        expected = linear(x)
    assert linear._packed is not None
    for twin in (copy.deepcopy(linear), pickle.loads(pickle.dumps(linear))):
        assert twin._packed is None and torch.equal(twin.weight, linear.weight)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
    assert linear._packed is not None  # the original keeps its packed weight


def test_a_rows_result_does_not_depend_on_the_batch():
    linear, x = layer(), torch.randn(64, 64)
    with torch.no_grad():
        assert torch.equal(linear(x)[:8], linear(x[:8].clone()))
