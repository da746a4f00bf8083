"""The fast path's Triton kernels (respec/engine/fast/kernels.py), run on the CPU under
Triton's interpreter: each kernel against the PyTorch it replaces, and the fast path with
kernels generating exactly what it generates without them."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import EagleHead
from respec.engine.fast import FastGenerator
from respec.engine.fast.fused import FusedModel, RopeTable, _rotate
from respec.engine.fast.kernel_layer import kernels_usable
from respec.engine.fast.state import FastState, StaticKV, visible_up_to
from tests.checkpoints import small_qwen2


@pytest.fixture(scope="module")
def kernels():
    # Under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any import).
    pytest.importorskip("triton")  # a dev dependency (pyproject.toml): absent only where it cannot install
    return importlib.import_module("respec.engine.fast.kernels")


def rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # one row: multiply-and-sum; more: tl.dot on 16-64
def test_gemv_with_norm_and_bias_is_the_normalised_product(kernels, rows):
    torch.manual_seed(rows)
    x, weight, bias, norm = torch.randn(rows, 40), torch.randn(72, 40), torch.randn(72), torch.rand(40) + 0.5
    out = kernels.gemv(x, weight, 72, norm=(norm, 1e-6), bias=bias)
    torch.testing.assert_close(out, F.linear(rms_norm(x, norm, 1e-6), weight, bias), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [2, 16])
def test_gated_gemv_is_silu_gate_times_up(kernels, rows):
    torch.manual_seed(rows)
    x, gate, up = torch.randn(rows, 24), torch.randn(36, 24), torch.randn(36, 24)
    out = kernels.gemv(x, torch.cat([gate, up]), 36, gated=True)
    torch.testing.assert_close(out, F.silu(x @ gate.T) * (x @ up.T), atol=1e-4, rtol=1e-4)


def test_gemv_adds_the_residual(kernels):
    torch.manual_seed(0)
    x, weight, residual = torch.randn(5, 300), torch.randn(20, 300), torch.randn(5, 20)
    out = kernels.gemv(x, weight, 20, residual=residual)
    torch.testing.assert_close(out, residual + x @ weight.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("b, t, config", [
    (1, 1, (4, 16, 4, 1)),  # one row, two programs per half head
    (1, 1, (2, 16, 4, 3)),  # one row, split over the inputs: the last to arrive rotates and stores
    (2, 3, (8, 32, 4, 1)),  # six tokens on tensor cores, a program per half head
    (2, 3, (4, 16, 4, 2)),
])
def test_qkv_rope_is_the_normalised_product_rotated_and_stored(kernels, b, t, config):
    """q out, k and v into the stores at each token's write slot, as the PyTorch layer
    computes them (RMSNorm, product with bias, RoPE at each token's position; a position
    past the table reads its last row); twice: the arrival counters go back to zero."""
    torch.manual_seed(b * 10 + t)
    heads, kv_heads, dim, hidden, slots = 4, 2, 16, 40, 12
    x, norm = torch.randn(b * t, hidden), torch.rand(hidden) + 0.5
    weight, bias = torch.randn((heads + 2 * kv_heads) * dim, hidden), torch.randn((heads + 2 * kv_heads) * dim)
    table = RopeTable(1.0 / 10000 ** (torch.arange(0, dim, 2) / dim), 20, torch.float32, torch.device("cpu"))
    positions = torch.tensor([[3, 8, 25][:t], [0, 19, 7][:t]])[:b]  # 25: past the table's 20 rows
    write_at = torch.tensor([[0, 5, 11][:t], [2, 3, 9][:t]])[:b]
    qkv = F.linear(rms_norm(x, norm, 1e-6), weight, bias).view(b, t, heads + 2 * kv_heads, dim)
    rotated = _rotate(qkv[:, :, : heads + kv_heads], *table(positions))
    for _ in range(2):
        k_store, v_store = torch.zeros(b, kv_heads, slots, dim), torch.zeros(b, kv_heads, slots, dim)
        q = kernels.qkv_rope(x, weight, (norm, 1e-6), bias, table.cos, table.signed_sin, positions, write_at, k_store,
                             v_store, heads, kv_heads, config=config)
        torch.testing.assert_close(q, rotated[:, :, :heads].reshape(b * t, heads, dim), atol=1e-4, rtol=1e-4)
        for row in range(b):
            for i, slot in enumerate(write_at[row].tolist()):
                torch.testing.assert_close(k_store[row, :, slot], rotated[row, i, heads:], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(v_store[row, :, slot], qkv[row, i, heads + kv_heads:], atol=1e-4,
                                           rtol=1e-4)
        written = torch.zeros(b, slots, dtype=torch.bool)
        written[torch.arange(b)[:, None], write_at] = True
        assert not k_store.transpose(1, 2)[~written].any() and not v_store.transpose(1, 2)[~written].any()
        assert not kernels._arrivals(x.device, 64).any()


@pytest.fixture(scope="module")
def model_and_head(tmp_path_factory):
    model = load_model(small_qwen2(tmp_path_factory.mktemp("kernels") / "m", vocab=8, layers=3, std=0.5, seed=2))
    torch.manual_seed(0)
    return model, EagleHead.for_target(model, capture_layers=(0, 1, 2))


def cached_pass(model, kernels, tokens, positions, state):
    fused = FusedModel(model, kernels=kernels)
    kv = StaticKV(state.k, state.v, positions)
    return fused.run(tokens, positions, kv, capture=(0, 2))


def assert_kernels_pass_is_the_fused_pass(model, b: int, t: int, prefix: int = 5, rows: int = 8, max_len: int = 24):
    """One pass of t tokens per row after a `prefix` cached by the fused path in two equal
    stores: through the kernels (whichever route the pass takes) and through the PyTorch
    layers, the logits, captured features and the KV store written agree."""
    states = [FastState(model.config, rows, max_len, 4, torch.float32, torch.device("cpu")) for _ in range(2)]
    cached = torch.randint(0, 8, (b, prefix))
    for state in states:
        cached_pass(model, False, cached, torch.arange(prefix).repeat(b, 1), state)
    tokens, positions = torch.randint(0, 8, (b, t)), prefix + torch.arange(t).repeat(b, 1)
    (logits, features), (expected_logits, expected_features) = (
        cached_pass(model, use, tokens, positions, state) for use, state in zip((True, False), states, strict=True))
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features, expected_features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states[0].k, states[1].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[0].v, states[1].v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b, t, attend_o", [(1, 1, False), (1, 1, True), (1, 4, True), (2, 3, False), (8, 4, False)])
def test_a_pass_through_the_kernels_equals_the_fused_pass(kernels, model_and_head, monkeypatch, b, t, attend_o):
    """Logits, captured features and the KV store written, after a prefix already cached
    (one row with attend_o too; 32 tokens: the 32-row dot products)."""
    monkeypatch.setattr(kernels, "ATTEND_O", attend_o)
    model, _ = model_and_head
    assert_kernels_pass_is_the_fused_pass(model, b, t)


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("rows", [3, 1])
def test_generation_with_kernels_is_generation_without(kernels, model_and_head, monkeypatch, k, rows):
    """Greedy, drafting or not, with rows finishing and the batch compacting (3 rows), or
    one row throughout with attention and the output product in one kernel (attend_o)."""
    monkeypatch.setattr(kernels, "ATTEND_O", rows == 1)
    model, head = model_and_head
    prompts = [[1, 2, 3], [4, 5, 6, 7, 1], [2, 2]][-rows:]
    outputs = []
    for use in (True, False):
        fast = FastGenerator(model, head, max_rows=4, max_len=24, max_new=8, max_k=3, eos_ids=(7,), kernels=use)
        assert all(layer.kernel_layer is not None for layer in fast.fused.layers) == use
        outputs.append([(r.tokens, r.steps) for r in fast.generate(prompts, k)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("t", [1, 3])
def test_attention_split_over_key_blocks_combines_to_softmax_attention(kernels, t):
    """150 keys: three blocks of 64, combined by the last program to arrive; a token sees
    the keys up to its position (row 0 ends in the first block, so the others are never
    read for it). Twice: the arrival counters must be back at zero for the next launch."""
    torch.manual_seed(t)
    rows, heads, kv_heads, keys, dim = 2, 4, 2, 150, 16
    q = torch.randn(rows * t, heads, dim)
    k_store, v_store = torch.randn(rows, kv_heads, keys, dim), torch.randn(rows, kv_heads, keys, dim)
    positions = torch.tensor([[40], [130]]) + torch.arange(t)
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q.view(rows, t, heads, dim).transpose(1, 2), k_store.repeat_interleave(group, 1),
        v_store.repeat_interleave(group, 1), attn_mask=visible_up_to(positions, keys),
    ).transpose(1, 2).reshape(rows * t, heads * dim)
    for _ in range(2):
        torch.testing.assert_close(kernels.attend(q, k_store, v_store, positions, t), expected, atol=1e-5, rtol=1e-5)
        assert not kernels._arrivals(q.device, rows * kv_heads).any()


@pytest.mark.parametrize("t, config", [(1, (16, 64, 4)), (3, (32, 16, 4)), (5, (16, 32, 4))])
def test_one_rows_attention_and_output_product_in_one_kernel(kernels, t, config):
    """attend_o: residual + bias + softmax attention over the keys up to each token's
    position @ w.T, heads' shares added up by the last program to arrive. 150 keys, the
    row's tokens at 128-132: the running softmax crosses key blocks (16-64 keys) and
    each token sees one more key than the one before. The stores hold a second row the
    kernel must not read. Twice: the arrival counters must be back at zero."""
    torch.manual_seed(t)
    heads, kv_heads, keys, dim, out_features = 4, 2, 150, 16, 40
    q = torch.randn(t, heads, dim)
    k_store, v_store = torch.randn(2, kv_heads, keys, dim), torch.randn(2, kv_heads, keys, dim)
    positions = 128 + torch.arange(t)[None, :]
    weight, bias, residual = torch.randn(out_features, heads * dim), torch.randn(out_features), torch.randn(t, 40)
    group = heads // kv_heads
    attended = F.scaled_dot_product_attention(
        q.view(1, t, heads, dim).transpose(1, 2), k_store[:1].repeat_interleave(group, 1),
        v_store[:1].repeat_interleave(group, 1), attn_mask=visible_up_to(positions, keys),
    ).transpose(1, 2).reshape(t, heads * dim)
    for _ in range(2):
        out = kernels.attend_o(q, k_store, v_store, positions, weight, bias, residual, config=config)
        torch.testing.assert_close(out, residual + attended @ weight.T + bias, atol=1e-4, rtol=1e-4)
        assert not kernels._arrivals(q.device, 8).any()


@pytest.mark.parametrize("rows", [1, 5])
def test_a_product_split_over_the_inputs_adds_the_shares_up(kernels, rows):
    """Three programs per block of outputs, each summing a share of the 40 inputs (the last
    share shorter), the last to arrive finishing: norm, bias, gate and residual as unsplit;
    twice, since the arrival counters must be back at zero for the next launch."""
    torch.manual_seed(rows)
    x, gate, up, norm = torch.randn(rows, 40), torch.randn(24, 40), torch.randn(24, 40), torch.rand(40) + 0.5
    bias, residual = torch.randn(48), torch.randn(rows, 24)
    normed = rms_norm(x, norm, 1e-6)
    expected = residual + F.silu(normed @ gate.T + bias[:24]) * (normed @ up.T + bias[24:])
    for _ in range(2):
        out = kernels.gemv(x, torch.cat([gate, up]), 24, norm=(norm, 1e-6), bias=bias, residual=residual, gated=True,
                           config=(16 if rows > 1 else 4, 16, 4, 3))
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        assert not kernels._arrivals(x.device, 8).any()


def test_kernels_are_off_by_default_on_a_cpu_and_when_turned_off(model_and_head, monkeypatch):
    model, head = model_and_head
    assert not FastGenerator(model, head, max_rows=2, max_len=24, max_new=4).kernels_on
    assert not kernels_usable(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("RESPEC_KERNELS", "0")
    assert not kernels_usable(torch.device("cuda"), torch.bfloat16)


def test_with_kernels_refreshed_weights_are_the_ones_generating(kernels, tmp_path):
    """An RL update in place, then ``refresh_weights``: the kernels read the new weights
    (the stacked copies and the layer's own), generating what the PyTorch layers do."""
    model = load_model(small_qwen2(tmp_path / "m", vocab=8, layers=2, std=0.5, seed=3))
    head = EagleHead.for_target(model, capture_layers=(0, 1))
    generators = [FastGenerator(model, head, max_rows=2, max_len=24, max_new=8, max_k=2, kernels=use)
                  for use in (True, False)]
    prompts = [[1, 2, 3], [4, 5]]
    before = [r.tokens for r in generators[0].generate(prompts, 2)]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    for generator in generators:
        generator.refresh_weights()
    after, expected = ([r.tokens for r in generator.generate(prompts, 2)] for generator in generators)
    assert after == expected
    assert after != before


def test_the_kernels_take_passes_that_fit_their_blocks(kernels, model_and_head):
    """At most 64 attention query rows (here 2 query heads per KV head: up to 32 tokens a
    row), at any batch; the GEMV kernels up to 64 tokens a pass by default (RESPEC_KERNEL_ROWS
    unset), the wide route past that. Longer rows (prefill) stay on the PyTorch layers."""
    assert kernels.MAX_ROWS == 64
    model, _ = model_and_head
    layer = FusedModel(model, kernels=True).layers[0]
    hidden = model.config.hidden_size
    assert layer.takes(torch.zeros(2, 32, hidden)) and layer.takes(torch.zeros(128, 1, hidden))
    assert layer.takes(torch.zeros(129, 1, hidden)) and layer.takes(torch.zeros(64, 5, hidden))
    assert not layer.takes(torch.zeros(1, 33, hidden))
    wide = layer.kernel_layer._wide
    assert not wide(64, 1) and not wide(16, 4) and wide(65, 1) and wide(32, 3)


@pytest.mark.parametrize("b, t", [(3, 1), (3, 4), (2, 3)])
def test_rope_store_rotates_and_stores_a_product_made_elsewhere(kernels, b, t):
    """The wide route's qkv comes from cuBLAS: rope_store rotates q and k at each token's
    position (past the table: its last row) and stores k and v at each write slot, as the
    PyTorch layer does; nothing else in the stores is touched."""
    torch.manual_seed(b * 10 + t)
    heads, kv_heads, dim, slots = 4, 2, 16, 12
    qkv = torch.randn(b * t, (heads + 2 * kv_heads) * dim)
    table = RopeTable(1.0 / 10000 ** (torch.arange(0, dim, 2) / dim), 20, torch.float32, torch.device("cpu"))
    positions = torch.tensor([[3, 8, 25, 1], [0, 19, 7, 2], [5, 6, 7, 8]])[:b, :t]  # 25: past the table's 20 rows
    write_at = torch.tensor([[0, 5, 11, 1], [2, 3, 9, 4], [6, 7, 8, 10]])[:b, :t]
    view = qkv.view(b, t, heads + 2 * kv_heads, dim)
    rotated = _rotate(view[:, :, : heads + kv_heads], *table(positions))
    k_store, v_store = torch.zeros(b, kv_heads, slots, dim), torch.zeros(b, kv_heads, slots, dim)
    q = kernels.rope_store(qkv, table.cos, table.signed_sin, positions, write_at, k_store, v_store, heads, kv_heads)
    torch.testing.assert_close(q, rotated[:, :, :heads].reshape(b * t, heads, dim), atol=1e-5, rtol=1e-5)
    for row in range(b):
        for i, slot in enumerate(write_at[row].tolist()):
            torch.testing.assert_close(k_store[row, :, slot], rotated[row, i, heads:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_store[row, :, slot], view[row, i, heads + kv_heads:], atol=1e-5, rtol=1e-5)
    written = torch.zeros(b, slots, dtype=torch.bool)
    written[torch.arange(b)[:, None], write_at] = True
    assert not k_store.transpose(1, 2)[~written].any() and not v_store.transpose(1, 2)[~written].any()


def test_rope_store_refuses_a_qkv_of_the_wrong_width(kernels):
    stores = torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="rope_store takes a contiguous \\[tokens, 128\\] qkv"):
        kernels.rope_store(torch.zeros(2, 96), torch.zeros(8, 16), torch.zeros(8, 16), torch.zeros(1, 2, dtype=torch.long),
                           torch.zeros(1, 2, dtype=torch.long), *stores, heads=4, kv_heads=2)


@pytest.mark.parametrize("tokens, n", [(1, 7), (5, 300), (3, 1024)])
def test_silu_mul_is_silu_gate_times_up(kernels, tokens, n):
    torch.manual_seed(n)
    gate_up = torch.randn(tokens, 2 * n)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("b, t", [(3, 2), (8, 4)])
def test_a_wide_pass_equals_the_fused_pass(kernels, model_and_head, monkeypatch, b, t):
    """Past MAX_ROWS tokens (here moved down to 4) a pass takes the wide route: cuBLAS
    products, rope_store, the attention kernel, silu_mul; logits, features and the KV
    store written equal the PyTorch layers' after a prefix already cached."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 4)
    model, _ = model_and_head
    assert FusedModel(model, kernels=True).layers[0].kernel_layer._wide(b, t)
    assert_kernels_pass_is_the_fused_pass(model, b, t)


@pytest.mark.parametrize("k", [0, 3])
def test_generation_through_the_wide_route_is_generation_without_kernels(kernels, model_and_head, monkeypatch, k):
    """Greedy, three rows finishing and compacting, every pass past 2 tokens wide: the
    verification and catch-up passes of k = 3 (3 x 4 tokens), decoding at 3 rows."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 2)
    model, head = model_and_head
    prompts = [[1, 2, 3], [4, 5, 6, 7, 1], [2, 2]]
    outputs = []
    for use in (True, False):
        fast = FastGenerator(model, head, max_rows=4, max_len=24, max_new=8, max_k=3, eos_ids=(7,), kernels=use)
        outputs.append([(r.tokens, r.steps) for r in fast.generate(prompts, k)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("rows", [100, 128])
def test_gemv_over_more_than_64_rows_is_the_product(kernels, rows):
    """RESPEC_KERNEL_ROWS=128: one program's block of rows is 128 (split over the inputs too)."""
    torch.manual_seed(rows)
    x, weight, bias, norm = torch.randn(rows, 40), torch.randn(72, 40), torch.randn(72), torch.rand(40) + 0.5
    for config in ((16, 16, 4, 1), (16, 16, 4, 2)):
        out = kernels.gemv(x, weight, 72, norm=(norm, 1e-6), bias=bias, config=config)
        torch.testing.assert_close(out, F.linear(rms_norm(x, norm, 1e-6), weight, bias), atol=1e-4, rtol=1e-4)


def test_with_128_rows_a_long_pass_through_the_kernels_equals_the_fused_pass(kernels, model_and_head, monkeypatch):
    """48 rows x 2 tokens (96 > 64): the wide route by default, the GEMV kernels' 128-row
    blocks with RESPEC_KERNEL_ROWS=128, and those agree with the PyTorch layers."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 128)
    model, _ = model_and_head
    layer = FusedModel(model, kernels=True).layers[0]
    assert not layer.kernel_layer._wide(48, 2)
    assert layer.takes(torch.zeros(48, 2, model.config.hidden_size))
    assert_kernels_pass_is_the_fused_pass(model, 48, 2, prefix=3, rows=48, max_len=16)


def test_kernel_rows_past_the_supported_sizes_are_refused(kernels, monkeypatch):
    monkeypatch.setenv("RESPEC_KERNEL_ROWS", "96")
    with pytest.raises(ValueError, match="RESPEC_KERNEL_ROWS must be 64, 128 or 256, got 96"):
        kernels._max_rows()


def test_one_rows_attention_and_output_in_one_kernel_is_opt_in(kernels, model_and_head, monkeypatch):
    """attend_o only where asked for (kernels.ATTEND_O, RESPEC_ATTEND_O=1): its time alone
    is unmeasured, and with a fused MLP beside it the step was slower on an H100; and only
    for one row of at most 16 tokens over a store of at most 2048 positions."""
    model, _ = model_and_head
    layer = FusedModel(model, kernels=True).layers[0].kernel_layer
    assert not kernels.ATTEND_O and not layer._attention_and_output_in_one(1, 1, 24)
    monkeypatch.setattr(kernels, "ATTEND_O", True)
    assert layer._attention_and_output_in_one(1, 16, 2048)
    assert not any(layer._attention_and_output_in_one(b, t, keys) for b, t, keys in ((2, 1, 24), (1, 17, 24),
                                                                                     (1, 1, 2049)))


def test_programmatic_dependent_launch_is_for_gpus_only(kernels, monkeypatch):
    """PDL (kernels.PDL, on unless RESPEC_PDL=0) changes nothing on a CPU: the interpreter
    has no grid dependency control, so the launch must not ask for it there (fails if the
    device guard goes: the interpreter raises on gdc_wait)."""
    monkeypatch.setattr(kernels, "PDL", True)
    assert kernels._pdl_launch(torch.device("cpu"), "gemv") == {}
    torch.manual_seed(0)
    x, weight = torch.randn(1, 40), torch.randn(72, 40)
    torch.testing.assert_close(kernels.gemv(x, weight, 72), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_pdl_can_be_narrowed_to_one_kind_of_kernel(kernels, monkeypatch):
    """kernels_check bisects PDL's graph hazard by turning it on for one kernel at a time:
    PDL_KERNELS names those that launch under it (None: all), where PDL is on at all."""
    monkeypatch.setattr(kernels, "_pdl", lambda device: True)  # as on a Hopper GPU
    monkeypatch.setattr(kernels, "PDL_PREFETCH", True)
    on, cpu = dict(USE_GDC=True, launch_pdl=True), torch.device("cpu")
    assert kernels._pdl_launch(cpu, "gemv") == {**on, "PREFETCH": True}  # products prefetch weights too
    monkeypatch.setattr(kernels, "PDL_KERNELS", frozenset({"attend"}))
    assert kernels._pdl_launch(cpu, "attend") == on
    assert kernels._pdl_launch(cpu, "gemv") == {}
    monkeypatch.setattr(kernels, "PDL_KERNELS", None)
    monkeypatch.setattr(kernels, "PDL_PREFETCH", False)
    assert kernels._pdl_launch(cpu, "qkv_rope") == {**on, "PREFETCH": False}


@pytest.mark.parametrize("rows, config", [(1, (4, 16, 4, 1)), (1, (4, 16, 4, 3)), (5, (16, 16, 4, 3))])
def test_products_prefetching_the_next_weight_tiles_compute_the_same(kernels, model_and_head, monkeypatch, rows,
                                                                      config):
    """PREFETCH (PDL's weight fetch ahead of the wait): each iteration's tiles loaded one
    iteration ahead, the first before the loop. The gated product with norm, bias and
    residual, split in three (the last share shorter), and a whole pass with qkv_rope:
    the same as without. The interpreter has no grid dependency control, so PREFETCH runs
    here without the wait."""
    monkeypatch.setattr(kernels, "_pdl_launch",
                        lambda device, kernel: {"PREFETCH": True} if kernel in kernels.PRODUCTS else {})
    torch.manual_seed(rows)
    x, gate, up, norm = torch.randn(rows, 40), torch.randn(24, 40), torch.randn(24, 40), torch.rand(40) + 0.5
    bias, residual = torch.randn(48), torch.randn(rows, 24)
    normed = rms_norm(x, norm, 1e-6)
    expected = residual + F.silu(normed @ gate.T + bias[:24]) * (normed @ up.T + bias[24:])
    out = kernels.gemv(x, torch.cat([gate, up]), 24, norm=(norm, 1e-6), bias=bias, residual=residual, gated=True,
                       config=config)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    test_a_pass_through_the_kernels_equals_the_fused_pass(kernels, model_and_head, monkeypatch, rows, 2, False)


def test_the_wide_routes_residual_products_add_a_bias_where_there_is_one(kernels):
    """o_proj and down_proj have no bias in Qwen2 (one addmm); a model whose do gets the
    product with its bias, then the residual."""
    from respec.engine.fast.kernel_layer import _plus_product

    torch.manual_seed(0)
    residual, x = torch.randn(6, 8), torch.randn(6, 5)
    for bias in (False, True):
        linear = torch.nn.Linear(5, 8, bias=bias)
        torch.testing.assert_close(_plus_product(residual, x, linear), residual + linear(x), atol=1e-6, rtol=1e-6)
