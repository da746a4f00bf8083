"""Arrays beside the header: numpy arrays and torch tensors travel as their own frames.

A message field typed `Array` holds a numpy array or a torch tensor. The codec replaces
it in the MessagePack header by a small descriptor (kind, dtype, shape, where) and
appends the raw bytes as a separate ZeroMQ frame, which is sent and received without a
copy. Two exceptions:
- Large arrays going to exactly one receiver in another process on the same host travel
  through a recycled shared-memory segment instead (see shared_memory.py).
- Device (CUDA) tensors never leave their process: inside one process they are passed
  by reference through `LocalRefs`; anything else is an error that says so.
"""

from __future__ import annotations

import abc
import sys
from typing import Any

import numpy as np

from respec.messages import shared_memory


class Array(abc.ABC):  # noqa: B024 - a virtual base: no methods, only registrations
    """Type for message fields holding a numpy array or a torch tensor (virtual base)."""


Array.register(np.ndarray)

NUMPY, TORCH, DEVICE_REF, SHARED = "np", "pt", "ref", "shm"


def _torch():
    """Import torch only when a tensor is seen: runtime-only processes start faster."""
    import torch

    Array.register(torch.Tensor)
    return torch


if "torch" in sys.modules:  # already paid for: register now so `isinstance` checks pass
    _torch()


class LocalRefs:
    """Process-wide table of device tensors in flight between actors of one process."""

    def __init__(self) -> None:
        self._objects: dict[int, Any] = {}
        self._next = 0

    def put(self, obj: Any) -> int:
        self._next += 1
        self._objects[self._next] = obj
        return self._next

    def take(self, key: int) -> Any:
        try:
            return self._objects.pop(key)
        except KeyError:
            raise ValueError(
                f"device tensor reference {key} is not in this process: device tensors "
                "travel by reference only between actors of one process group; publish "
                "weights through a WeightsHandle (shared memory or file) instead"
            ) from None


LOCAL_REFS = LocalRefs()


def _torch_dtype(name: str):
    torch = _torch()
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


_SHARED_MEMORY = shared_memory.available()


def shared_memory_available() -> bool:
    return _SHARED_MEMORY


class ArrayPacker:
    """Encoder side: turns arrays into descriptors and collects their frames."""

    def __init__(self, allow_device_refs: bool, use_shared_memory: bool = False) -> None:
        self.reset(allow_device_refs, use_shared_memory)

    def reset(self, allow_device_refs: bool, use_shared_memory: bool) -> None:
        """Ready for the next message (the codec reuses one packer per thread)."""
        self.allow_device_refs = allow_device_refs
        self.use_shared_memory = use_shared_memory and shared_memory_available()
        self.frames: list[Any] = []

    def enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._pack_numpy(obj)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._pack_torch(obj)
        raise NotImplementedError(f"cannot encode a {type(obj).__name__} in a message")

    def _pack_numpy(self, array: np.ndarray) -> list:
        if array.dtype.hasobject:
            raise TypeError("object arrays cannot travel in a message")
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            array = array.copy(order="C")
        if self.use_shared_memory and array.nbytes >= shared_memory.MIN_BYTES:
            raw = array.reshape(-1).view(np.uint8)
            return [SHARED, "np:" + array.dtype.str, list(array.shape), shared_memory.write(raw)]
        self.frames.append(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
        return [NUMPY, array.dtype.str, list(array.shape), len(self.frames) - 1]

    def _pack_torch(self, tensor) -> list:
        # Registers torch.Tensor as an Array: a device reference is decoded in this process,
        # and a process whose first tensor is on a GPU would otherwise reject it on receipt
        # ("Expected `Array`, got `Tensor`": every CapturedTargets of an H100 run, e1f3871).
        _torch()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.device.type != "cpu":
            if not self.allow_device_refs:
                raise ValueError(
                    f"a {tensor.device} tensor cannot be sent to another process; "
                    "move it to the CPU or publish it through a WeightsHandle"
                )
            return [DEVICE_REF, dtype, list(tensor.shape), LOCAL_REFS.put(tensor)]
        tensor = tensor.detach().contiguous()
        raw = tensor.view(-1).view(_torch().uint8).numpy() if tensor.numel() else b""
        if self.use_shared_memory and tensor.numel() and raw.nbytes >= shared_memory.MIN_BYTES:
            return [SHARED, "pt:" + dtype, list(tensor.shape), shared_memory.write(raw)]
        self.frames.append(raw)
        return [TORCH, dtype, list(tensor.shape), len(self.frames) - 1]


class ArrayUnpacker:
    """Decoder side: rebuilds arrays from descriptors, viewing the frames without copies."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames

    def dec_hook(self, kind: type, obj: Any) -> Any:
        if kind is not Array:
            raise TypeError(f"no decoder for {kind!r}")
        if not (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[1], str)
                and isinstance(obj[2], list)):
            raise ValueError(f"malformed array descriptor {obj!r}")
        tag, dtype, shape, index = obj
        if tag == DEVICE_REF:
            return LOCAL_REFS.take(index)
        if tag == SHARED:
            return self._from_shared(dtype, shape, index)
        if not isinstance(index, int) or not 0 <= index < len(self.frames):
            raise ValueError(f"array frame {index} missing ({len(self.frames)} frames)")
        buffer = self.frames[index]
        if tag == NUMPY:
            return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
        if tag == TORCH:
            return self._torch_view(buffer, dtype, shape)
        raise ValueError(f"unknown array kind {tag!r}")

    def _from_shared(self, dtype: str, shape: list[int], name: Any) -> Any:
        kind, _, dtype = dtype.partition(":")
        raw = shared_memory.read(str(name))
        if kind == NUMPY:
            return raw.view(np.dtype(dtype)).reshape(shape)
        return _torch().from_numpy(raw).view(_torch_dtype(dtype)).reshape(shape)

    @staticmethod
    def _torch_view(buffer, dtype: str, shape: list[int]):
        torch = _torch()
        torch_dtype = _torch_dtype(dtype)
        if len(buffer) == 0:
            return torch.empty(shape, dtype=torch_dtype)
        if memoryview(buffer).readonly:  # torch tensors must own writable memory
            buffer = bytearray(buffer)
        return torch.frombuffer(buffer, dtype=torch_dtype).reshape(shape)

