"""Choosing an actor's device."""

from __future__ import annotations

import torch


def bf16_autocast(device: torch.device, on: bool = True):
    """bf16 autocast where `device` is a GPU and `on` (float32 weights run their passes in
    bf16, as generation does); entered but disabled on a CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on and device.type == "cuda")


def use_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device, made this process's current CUDA device when it names a
    GPU by index ("cuda:1"): CUDA graph capture, Triton launches, new streams and
    `torch.cuda.synchronize()` follow the current device, not the tensors', so an actor on
    the second GPU of a host would otherwise capture, launch and wait on the first."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def gpu_of(name: str) -> torch.device | None:
    """The GPU an actor's device setting puts it on, with its index ("cuda" is a fresh
    process's current device, 0; "auto" is that GPU where there is one); None off the GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return None
    return torch.device("cuda", 0 if device.index is None else device.index)
