"""SD switched off and on mid-generation: plain steps capture no drafter features, and the
rows' windows are rebuilt from the KV cache when SD comes back on. Greedy output equals plain
greedy decoding token for token, and the drafts (so the accepted counts) equal those of an
engine that captured features on every step."""

from __future__ import annotations

import pytest
import torch

from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleDrafter
from respec.engine.speculative import Sampling, SpeculativeEngine
from tests.engine.test_model_drafters import VOCAB, target  # noqa: F401 (fixture)
from tests.heads import greedy_distilled_head

WINDOW = 5
GREEDY = Sampling(temperature=0.0, max_new_tokens=24)
CHAIN, TREE = DraftShape(4, 1, 4), DraftShape(3, 2, 6)
# Off-periods shorter and longer than the window; rows admitted while SD is off too.
SCHEDULE = [CHAIN, None, None, TREE, None, None, None, None, None, None, None, CHAIN, None, TREE, TREE,
            None, None, None, CHAIN]


@pytest.fixture(scope="module")
def trained_head(target):  # noqa: F811
    """Briefly distilled: enough for drafts to be accepted, so wrong features would show."""
    generator = torch.Generator().manual_seed(99)
    train_prompts = [torch.randint(0, VOCAB, (4,), generator=generator) for _ in range(24)]
    return greedy_distilled_head(target, train_prompts, max_new_tokens=24, steps=60)


def prompts(count: int, seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (3 + 2 * (n % 4),), generator=generator) for n in range(count)]


def engine_for(model, head, capture_while_plain: bool) -> SpeculativeEngine:
    drafter = EagleDrafter(model, head, feature_window=WINDOW)
    return SpeculativeEngine(model, drafter, max_rows=4, max_len=128, capture_while_plain=capture_while_plain)


def admit(engine: SpeculativeEngine, waiting: list[torch.Tensor], order: dict) -> None:
    count = min(engine.target.free_slots, len(waiting))
    if count:
        ids = engine.add(waiting[:count], GREEDY, reserve=CHAIN.num_draft + TREE.num_draft)
        order.update({row_id: len(order) + i for i, row_id in enumerate(ids)})
        del waiting[:count]


def expected_window(model, layers, row) -> torch.Tensor:
    """The features capturing every step would hold: a full forward over the history."""
    with torch.no_grad():
        captured = model(row.history()[None], capture_layers=layers).captured
    return torch.cat(captured, dim=-1)[0, :-1][-WINDOW:]


def test_sd_off_and_on_is_exact_and_drafts_as_if_features_were_always_captured(target, trained_head):  # noqa: F811
    pool = prompts(6)
    always, rebuilt = engine_for(target, trained_head, True), engine_for(target, trained_head, False)
    waiting = {always: list(pool), rebuilt: list(pool)}
    order = {always: {}, rebuilt: {}}
    step = accepted = 0
    while waiting[rebuilt] or rebuilt.rows:
        shape = SCHEDULE[step % len(SCHEDULE)]
        stats = []
        for engine in (always, rebuilt):
            admit(engine, waiting[engine], order[engine])
            stats.append(engine.step(shape))
        assert stats[0] == stats[1], f"step {step} ({shape}): the drafts differ"
        accepted += stats[1].accepted
        if shape is not None and SCHEDULE[step % len(SCHEDULE) - 1] is None:  # right after a rebuild
            for row in rebuilt.rows.values():
                torch.testing.assert_close(row.features, expected_window(target, rebuilt.drafter_layers, row),
                                           atol=1e-4, rtol=1e-4)
        step += 1
    assert not always.rows
    plain = SpeculativeEngine(target, None, max_rows=4, max_len=128).generate(pool, GREEDY)
    outputs = [row.tokens for row in sorted(rebuilt.finished, key=lambda r: order[rebuilt][r.row_id])]
    assert outputs == [row.tokens for row in plain]
    assert accepted > 20  # drafts were accepted: features that were wrong would have shown
    assert sum(s is not None for s in SCHEDULE) * 2 < step  # the schedule really switched, many times


def test_plain_steps_capture_nothing_and_sd_steps_rebuild_the_window(target, trained_head):  # noqa: F811
    engine = engine_for(target, trained_head, False)
    engine.add(prompts(3), GREEDY, reserve=TREE.num_draft)
    engine.step(CHAIN)
    ends = {row.row_id: row.features_end for row in engine.rows.values()}
    for _ in range(3):
        engine.step(None)
    assert {row.row_id: row.features_end for row in engine.rows.values()} == ends
    assert all(row.features_end < row.committed for row in engine.rows.values())
    engine.step(TREE)
    for row in engine.rows.values():
        assert row.features_end == row.committed
        torch.testing.assert_close(row.features, expected_window(target, engine.drafter_layers, row),
                                   atol=1e-4, rtol=1e-4)
