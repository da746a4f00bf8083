"""New weights into a live model, in place, with one launch for all of them.

`Module.load_state_dict` copies tensor by tensor: for the 0.5B shape's 291 tensors (float32
from the trainer into the bf16 policy) that took 6-10 ms of launches on two H100 machines,
against 1.7-2.5 ms for one `torch._foreach_copy_`; a whole load 5.6 ms against 10.6 ms
(bench/policy_load.py, docs/PERFORMANCE.md). A policy load sits between two batches of
rollouts, so those milliseconds are on the RL step's critical path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def copy_in(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy the tensors whose names the module has (parameters and buffers; others are
    ignored, as `load_state_dict(strict=False)` does) into it, converting dtype and device.
    A shape mismatch raises before anything is copied. Returns how many were copied."""
    own = module.state_dict()
    targets, sources, seen = [], [], set()
    for name, tensor in tensors.items():
        target = own.get(name)
        if target is None:
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit the model's {tuple(target.shape)}")
        if target.numel() and target.data_ptr() in seen:  # tied weights: one name is enough, one write
            continue
        seen.add(target.data_ptr())
        targets.append(target)
        sources.append(tensor)
    with torch.no_grad():
        if all(t.device == s.device for t, s in zip(targets, sources, strict=True)):
            if targets:
                torch._foreach_copy_(targets, sources)
        else:  # from a file into a GPU model, say: a tensor at a time, as load_state_dict does
            for target, source in zip(targets, sources, strict=True):
                target.copy_(source)
    return len(targets)
