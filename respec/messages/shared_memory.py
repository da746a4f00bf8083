"""Large arrays between processes of one host: shared-memory files, recycled.

A Unix socket copies bytes through the kernel twice, and a fresh shared-memory file costs
a page fault per page (slow on VMs). So segments are recycled: the receiver's array is a
map of the segment, and when the last view of that array is gone, the segment is renamed
back into the free pool, where the next sender of the same size claims it by an atomic
rename and writes into pages that already exist. The launcher removes a run's segments
when the run ends.
"""

from __future__ import annotations

import mmap
import os
import uuid
import weakref

import numpy as np

SHM_DIR = "/dev/shm"
MIN_BYTES = 1 << 20  # below this, a ZeroMQ frame is as fast
_scope = "respec-"  # "respec-<run>-": set by the process group, used for clean-up
MAX_KEPT_MAPS = 8
_kept_maps: dict[str, mmap.mmap] = {}  # segment id -> a mapping no live array uses (this process)


def available() -> bool:
    return os.path.isdir(SHM_DIR)


def set_scope(run_name: str) -> None:
    global _scope
    _scope = f"respec-{run_name}-"


def remove_scope(run_name: str) -> int:
    """Delete every segment a run left behind; returns how many."""
    prefix = f"respec-{run_name}-"
    removed = 0
    for name in os.listdir(SHM_DIR) if available() else []:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def write(raw: np.ndarray) -> str:
    """Copy a contiguous uint8 array into a segment (recycled if one is free); its name."""
    size = raw.nbytes
    name = _claim_free(size) or _create(size)
    descriptor = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        view, offset = memoryview(raw).cast("B"), 0
        while offset < size:  # pwrite: no page faults on the sender side
            offset += os.pwrite(descriptor, view[offset:], offset)
    finally:
        os.close(descriptor)
    return name


def read(name: str) -> np.ndarray:
    """Map a segment as a writable uint8 array; it returns to the pool when that array dies."""
    if "/" in name or not name.startswith("respec-") or "-busy-" not in name:
        raise ValueError(f"bad shared-memory segment name {name!r}")
    path = os.path.join(SHM_DIR, name)
    if not os.path.exists(path):
        raise ValueError(f"shared-memory segment {name!r} is gone (received twice?)")
    segment = _segment_id(name)
    mapped = _kept_maps.pop(segment, None) or _map(path)
    array = np.frombuffer(mapped, dtype=np.uint8)
    weakref.finalize(array, _release, path, segment, mapped)
    return array


def _segment_id(name: str) -> str:
    return name.rsplit("-", 1)[-1]  # the uuid: stable across busy/free renames


def _map(path: str) -> mmap.mmap:
    descriptor = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(descriptor, os.fstat(descriptor).st_size,
                         flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(descriptor)


def _create(size: int) -> str:
    name = f"{_scope}busy-{size}-{uuid.uuid4().hex}"
    descriptor = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(descriptor)
    return name


def _claim_free(size: int) -> str | None:
    prefix = f"{_scope}free-{size}-"
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            busy = name.replace("-free-", "-busy-", 1)
            try:
                os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, busy))
                return busy
            except FileNotFoundError:
                continue  # another sender claimed it first
    return None


def _release(path: str, segment: str, mapped: mmap.mmap) -> None:
    """The last view of a received array died: keep its mapping, hand the segment back."""
    _kept_maps[segment] = mapped
    while len(_kept_maps) > MAX_KEPT_MAPS:  # no live array uses a kept map: safe to close
        _kept_maps.pop(next(iter(_kept_maps))).close()
    try:
        os.rename(path, path.replace("-busy-", "-free-", 1))
    except FileNotFoundError:
        pass  # the run's clean-up already removed it
