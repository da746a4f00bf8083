"""use_device: an indexed GPU becomes the process's current device."""

from __future__ import annotations

import torch

from respec.engine.devices import gpu_of, use_device


def test_an_indexed_gpu_becomes_current_and_others_leave_it(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert use_device("cpu") == torch.device("cpu")
    assert use_device("cuda") == torch.device("cuda")  # no index: the current one stays
    assert use_device("cuda:1") == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]


def test_gpu_of_names_the_gpu_with_its_index(monkeypatch):
    assert gpu_of("cuda") == torch.device("cuda", 0)  # a fresh process's current GPU
    assert gpu_of("cuda:1") == torch.device("cuda", 1)
    assert gpu_of("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_of("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_of("auto") is None
