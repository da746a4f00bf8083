"""Per-row temperature / top-k / top-p, sampling from the result, behaviour log-probs, and
the rows' counter-based random streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respec.engine.sampling import (
    RowStreams,
    behaviour_logprobs,
    sample,
    sample_inverse_cdf,
    stream_key,
    target_probs,
    threefry2x32,
    validate,
)
from tests.engine.stats import chi_square_pvalue

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def rows(**params):
    """Per-row parameter tensors: rows(temperature=[...], top_k=[...], top_p=[...])."""
    n = len(next(iter(params.values())))
    return (
        torch.tensor(params.get("temperature", [1.0] * n)),
        torch.tensor(params.get("top_k", [0] * n)),
        torch.tensor(params.get("top_p", [1.0] * n)),
    )


def test_each_row_gets_its_own_parameters():
    logits = LOGITS.expand(5, -1)
    probs = target_probs(logits, *rows(temperature=[1.0, 0.5, 0.0, 1.0, 1.0], top_k=[0, 0, 0, 2, 0],
                                       top_p=[1.0, 1.0, 1.0, 1.0, 0.7]))
    assert probs.dtype == torch.float32
    assert torch.allclose(probs[0], LOGITS.softmax(-1))
    assert torch.allclose(probs[1], (LOGITS / 0.5).softmax(-1))
    assert probs[2].tolist() == [1.0, 0, 0, 0, 0, 0]  # greedy: one-hot at the argmax
    assert torch.allclose(probs[3], torch.cat([LOGITS[:2].softmax(-1), torch.zeros(4)]))
    full = LOGITS.softmax(-1)  # 0.55, 0.20, 0.12, ... : the top two reach 0.7
    assert full[0] < 0.7 <= full[:2].sum()
    assert torch.allclose(probs[4], torch.cat([LOGITS[:2].softmax(-1), torch.zeros(4)]))


def test_top_k_keeps_exactly_k_even_with_ties_and_then_top_p_applies():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert int((target_probs(logits, *rows(top_k=[2])) > 0).sum()) == 2
    probs = target_probs(LOGITS[None], *rows(top_k=[3], top_p=[0.75]))  # of the top 3, the top 2 reach 0.75
    assert (probs[0] > 0).tolist() == [True, True, False, False, False, False]


def test_positions_share_their_rows_parameters():
    logits = torch.randn(2, 3, 6)
    probs = target_probs(logits, *rows(temperature=[0.0, 2.0]))
    assert torch.equal(probs[0].argmax(-1), logits[0].argmax(-1)) and bool((probs[0].max(-1).values == 1).all())
    assert torch.allclose(probs[1], (logits[1] / 2).softmax(-1))


def test_sample_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = sample(probs.expand(20_000, -1), torch.Generator().manual_seed(0))
    assert draws.shape == (20_000,)
    _, pvalue = chi_square_pvalue(torch.bincount(draws, minlength=5), probs)
    assert pvalue > 1e-3
    assert sample(torch.eye(3)[None].expand(2, 3, 3)).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_behaviour_logprobs_use_temperature_one_for_greedy_rows():
    logits = torch.randn(3, 4, 6)
    tokens = torch.randint(0, 6, (3, 4))
    got = behaviour_logprobs(logits, tokens, torch.tensor([0.0, 0.7, 1.0]))
    for row, temperature in enumerate((1.0, 0.7, 1.0)):
        want = torch.log_softmax(logits[row] / temperature, -1).gather(-1, tokens[row, :, None])[:, 0]
        assert torch.allclose(got[row], want)


@pytest.mark.parametrize(
    "params, message",
    [
        ((-0.5, 0, 1.0), "temperature must be >= 0 (0 = greedy), got -0.5"),
        ((float("nan"), 0, 1.0), "temperature must be >= 0 (0 = greedy), got nan"),
        ((1.0, -1, 1.0), "top_k must be an integer >= 0 (0 = off), got -1"),
        ((1.0, 2.5, 1.0), "top_k must be an integer"),
        ((1.0, 0, 0.0), "top_p must be in (0, 1] (1 = off), got 0.0"),
        ((1.0, 0, 1.5), "top_p must be in (0, 1] (1 = off), got 1.5"),
    ],
)
def test_invalid_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        validate(*params)
    temperature, top_k, top_p = params
    if not isinstance(top_k, float):  # the per-row tensors are checked by target_probs too
        with pytest.raises(ValueError, match=message.split(" must")[0]):
            target_probs(LOGITS[None], torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))


# ---------------------------------------------------------------- row streams


@pytest.mark.parametrize("key, counter, expected", [  # Random123's known-answer tests (kat_vectors)
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
])
def test_threefry_matches_the_reference_vectors(key, counter, expected):
    words = threefry2x32(tuple(np.array([k]) for k in key), tuple(np.array([c]) for c in counter))
    assert tuple(int(w[0]) for w in words) == expected


def test_a_rows_draws_depend_only_on_its_key_and_position():
    keys = torch.tensor([stream_key(0, f"g{g}/{i}") for g in range(3) for i in range(4)])
    positions = torch.arange(12) + 7
    table = RowStreams(keys, positions).uniforms(3, 4)
    alone = RowStreams(keys[5:6], positions[5:6]).uniforms(3, 4)
    assert torch.equal(alone[0], table[5])  # batch mates change nothing
    later = RowStreams(keys[5:6], positions[5:6] + 1).uniforms(2, 4)
    assert torch.equal(later[0], table[5, 1:])  # one position on: the same numbers, shifted
    assert table.unique().numel() == table.numel()  # no repeats across rows, positions, lanes
    assert stream_key(0, "g0/0") != stream_key(1, "g0/0") and stream_key(0, "g0/0") < 2**63


def test_stream_uniforms_are_uniform_and_sample_the_distribution():
    keys = torch.tensor([stream_key(3, f"row/{r}") for r in range(4000)])
    u = RowStreams(keys, torch.zeros(4000, dtype=torch.long)).uniforms(5, 1).flatten()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    _, pvalue = chi_square_pvalue(torch.bincount((u * 20).long(), minlength=20), torch.ones(20))
    assert pvalue > 1e-3
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = sample_inverse_cdf(probs.expand(len(u), -1), u)
    _, pvalue = chi_square_pvalue(torch.bincount(draws, minlength=5), probs)
    assert pvalue > 1e-3
