"""The fast path's step costs kept on disk (a GPU's repeat from run to run)."""

from __future__ import annotations

import json

import torch

from respec.engine.fast import step_costs
from respec.engine.fast.step_costs import StepCostCache, step_cost_key

COSTS = {(1, 0): 0.00066, (1, 4): 0.0011, (64, 0): 0.0015, (64, 4): 0.0034}


def test_costs_round_trip_by_key_and_another_key_measures_again(tmp_path):
    cache = StepCostCache(tmp_path)
    key = {"gpu": "NVIDIA H100 80GB HBM3", "model": "abc", "lengths": [0, 4]}
    assert cache.load(key) is None
    cache.store(key, COSTS)
    assert StepCostCache(tmp_path).load(key) == COSTS  # a later run reads them back
    assert cache.load({**key, "model": "abd"}) is None
    (path,) = tmp_path.glob("step-costs-nvidia-h100-80gb-hbm3-*.json")
    path.write_text(json.dumps({"key": {**key, "model": "other"}, "costs": {"1/0": 1.0}}))
    assert cache.load(key) is None  # a file whose key differs is not this key's
    path.write_text("{cut short")
    assert cache.load(key) is None


def test_nothing_is_kept_on_the_cpu_or_when_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_TUNE_CACHE", str(tmp_path))
    assert StepCostCache.for_device(torch.device("cpu")).folder is None  # a shared CPU's costs do not repeat
    assert StepCostCache.for_device(torch.device("cuda")).folder == tmp_path
    monkeypatch.setenv("RESPEC_TUNE_CACHE", "off")
    assert StepCostCache.for_device(torch.device("cuda")).folder is None
    StepCostCache(None).store({"gpu": "x"}, COSTS)  # no folder: nothing written, nothing read
    assert StepCostCache(None).load({"gpu": "x"}) is None


def test_the_key_follows_the_code_the_model_shape_and_the_switches(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    code = tmp_path / "fast"
    code.mkdir()
    (code / "kernels.py").write_text("v1")
    monkeypatch.setattr(step_costs, "FAST_PATH_CODE", code)
    model, head = tmp_path / "policy", tmp_path / "head"
    model.mkdir()
    head.mkdir()
    (model / "config.json").write_text('{"hidden_size": 896}')
    (head / "eagle_head.json").write_text('{"layers": 1}')

    def key(**settings):
        return step_cost_key(torch.device("cuda"), model, head, max_rows=64, **settings)

    first = key()
    assert key() == first and key(max_len=256) != first
    (model / "config.json").write_text('{"hidden_size": 1024}')
    assert key() != first
    (model / "config.json").write_text('{"hidden_size": 896}')
    (code / "kernels.py").write_text("v2")
    assert key() != first
    (code / "kernels.py").write_text("v1")
    monkeypatch.setenv("RESPEC_PDL", "0")
    assert key() != first
