"""Choosing an actor's device."""

from __future__ import annotations

import torch


def use_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device, made this process's current CUDA device when it names a
    GPU by index ("cuda:1"): CUDA graph capture, Triton launches, new streams and
    `torch.cuda.synchronize()` follow the current device, not the tensors', so an actor on
    the second GPU of a host would otherwise capture, launch and wait on the first."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device
