"""The rule on an offline replay of `respec bench adaptive` (tests/sched/replay.py): the
quiet host's measured machine, where the static choices are within a few percent of each
other at small batch and plain decoding wins from 16 rows up. The rule before the
noise-aware changes flapped among close shapes there (median cells down to 0.90 of the
best static choice, 7 of 24 cells under 0.95 over three seeds, mean 0.969)."""

from __future__ import annotations

import statistics

import pytest

from tests.sched.replay import Machine, quiet_host, quiet_rule, replay


@pytest.fixture(scope="module")
def quiet_runs():
    data = quiet_host()
    return [replay(Machine(data), quiet_rule(data), seed=seed) for seed in range(3)]


def test_close_configs_cost_little_on_the_quiet_host(quiet_runs):
    cells = [statistics.median(r["ratios"]) for run in quiet_runs for r in run.values()]
    assert statistics.mean(cells) >= 0.98 and min(cells) >= 0.92, cells


def test_plain_decoding_where_it_wins_and_the_long_tail_at_its_speed(quiet_runs):
    for run in quiet_runs:
        for name in (32, 64, "tail"):
            assert statistics.median(run[name]["ratios"]) >= 0.97, (name, run[name])
