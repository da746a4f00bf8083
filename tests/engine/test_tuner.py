"""Choosing the kernels' configurations (respec/engine/fast/tuner.py): the one that stays
fastest, and on disk, read back by a later run, merged between processes, never reused
across GPUs, Triton versions or kernel code, and never a reason to fail."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")  # a dev dependency (pyproject.toml): absent only where it cannot install

from respec.engine.fast import tuner  # noqa: E402
from respec.engine.fast.tuner import TuningCache, cache_path  # noqa: E402

KEY = ("gemv", 896, 4864, False, False, True, False, 1)


def test_a_later_run_reads_back_what_an_earlier_one_tuned(tmp_path):
    path = tmp_path / "cache.json"
    TuningCache(path).put(KEY, (2, 2048, 8, 1))
    assert TuningCache(path).get(KEY) == (2, 2048, 8, 1)
    assert TuningCache(path).get(("gemv", 1)) is None


def test_two_processes_writing_keep_both_choices(tmp_path):
    """A trainer and a generator tune different shapes on one GPU, each holding the file
    as it was when it started: the second write must not drop the first's choice."""
    path = tmp_path / "cache.json"
    first, second = TuningCache(path), TuningCache(path)
    first.put(KEY, (2, 2048, 8, 1))
    second.put(("attend", 1, 14, 2, 65, 64, 32), (128, 4))
    again = TuningCache(path)
    assert again.get(KEY) == (2, 2048, 8, 1) and again.get(("attend", 1, 14, 2, 65, 64, 32)) == (128, 4)


def test_a_damaged_file_is_tuned_again_not_an_error(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text('{"a crash cut this sho')
    cache = TuningCache(path)
    assert cache.get(KEY) is None
    cache.put(KEY, (4, 512, 4, 1))
    assert TuningCache(path).get(KEY) == (4, 512, 4, 1)


def test_an_unwritable_folder_warns_and_keeps_the_choice_for_this_run(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    cache = TuningCache(blocker / "cache.json")
    with pytest.warns(UserWarning, match="not writable"):
        cache.put(KEY, (4, 512, 4, 1))
    assert cache.get(KEY) == (4, 512, 4, 1)


def test_one_file_per_gpu_and_kernel_code_and_none_when_off(tmp_path, monkeypatch):
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device.index])
    monkeypatch.setenv("RESPEC_TUNE_CACHE", str(tmp_path))
    source, edited = tmp_path / "kernels.py", tmp_path / "kernels_edited.py"
    source.write_text("code")
    edited.write_text("code, edited")
    h100, h200 = torch.device("cuda", 0), torch.device("cuda", 1)
    path = cache_path(h100, source)
    assert path.parent == tmp_path and "nvidia-h100-80gb-hbm3" in path.name
    assert len({path, cache_path(h200, source), cache_path(h100, edited)}) == 3
    monkeypatch.setenv("RESPEC_TUNE_CACHE", "off")
    assert cache_path(h100, source) is None


def test_the_tuner_takes_a_stored_choice_without_timing(tmp_path, monkeypatch):
    """tuner.tuned on a GPU: a configuration on disk is used as it is (no launch, no
    timing) and kept for the rest of the run."""
    gpu = torch.device("cuda", 0)
    stored = TuningCache(tmp_path / "cache.json")
    stored.put(KEY, (2, 2048, 8, 1))
    monkeypatch.setattr(tuner, "_stored", {gpu: stored})
    monkeypatch.setattr(tuner, "chosen", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def launch(config):
        raise AssertionError("a stored choice must not be timed")

    x = types.SimpleNamespace(is_cuda=True, device=gpu)  # a GPU tensor, as far as tuned looks
    assert tuner.tuned(launch, KEY, x, (4, 512, 4, 1), ((8, 512, 4, 1),)) == (2, 2048, 8, 1)
    assert tuner.chosen[KEY] == (2, 2048, 8, 1)


def test_the_tuner_keeps_the_configuration_that_stays_fastest():
    """A configuration whose first timing was lucky does not win once the best few are
    timed again, interleaved (fails if the first pass alone decides); one that cannot
    build (None) is never picked."""
    true_ms = {"a": 1.0, "b": 1.3, "c": 1.6, "broken": None}
    calls = {name: 0 for name in true_ms}

    def timed(config, launches):
        calls[config] += 1
        if true_ms[config] is None:
            return None
        return 0.9 if config == "b" and calls[config] == 1 else true_ms[config]  # b's first median was lucky

    assert tuner.fastest(timed, ("c", "b", "broken", "a")) == "a"
    assert calls["b"] == 1 + 3 and calls["broken"] == 1
