"""Weights across processes and devices: the transports behind a `WeightsHandle`.

A weight announcement (`PolicyWeights`, `DraftWeights`) carries a version and a handle;
the bytes travel another way, chosen by `run.weights` (docs/RUNTIME.md, "Weights across
devices"):

- "local": tensors by reference (same process; the actors build these handles).
- "file": a safetensors snapshot (any host with the path; the fallback).
- "cuda_ipc": the publisher copies the weights into one flat CUDA buffer per dtype and
  keeps the last `keep` versions alive; the handle carries each buffer's CUDA IPC handle
  (torch.multiprocessing's `reduce_tensor`, a few hundred bytes), a manifest (name,
  dtype, shape, offset) and the set's version tag. A receiver on the same host (any GPU)
  maps the buffers and copies out of them, or skips a version written over since
  (SupersededWeights).
- "collective": a torch.distributed process group between the publisher's process
  (rank 0) and each receiving process, built once from a TCP store whose address is the
  handle's `location`; every version is one broadcast of a small header and one of each
  flat buffer (one per dtype). `backend` is "nccl" when the publisher's weights are on
  CUDA, "gloo" on the CPU (the tests).

This module imports only torch (and the standard library) at import time, so that the
GPU benchmark (bench/weight_sync.py) can load it by path on a machine without pyzmq or
msgspec. Handles are plain dataclasses here; `WeightsHandle` (respec/messages) has the
same fields, and every function reading a handle takes either.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("auto", "local", "file", "cuda_ipc", "collective")


class WeightsTransferError(RuntimeError):
    """A weights kind that cannot work here (no CUDA, a released version, a broken group)."""


class SupersededWeights(WeightsTransferError):
    """A cuda_ipc version whose buffers the publisher has already written a newer version
    into (the receiver fell `keep` versions behind). Raised before anything is copied; the
    newer version's announcement is already on its way, so receivers skip this one."""


class TornWeights(WeightsTransferError):
    """A cuda_ipc version the publisher wrote a newer version over while it was being
    copied out (the receiver was slower than `keep` publishes). Raised after the copy, so
    what the receiver copied may mix two versions: it must not use those tensors until it
    has loaded the newer version, whose announcement is on its way and which overwrites
    every tensor. A receiver that cannot wait (the Verifier mid-request) lets it raise."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor inside a flat buffer: elements [offset, offset + numel)."""

    name: str
    dtype: str  # "bfloat16", "float32", ...
    shape: list[int]
    buffer: int  # index into the version's flat buffers
    offset: int  # in elements


@dataclass(frozen=True)
class IpcBuffer:
    """One flat CUDA buffer as torch's `reduce_tensor` shares it (same host only)."""

    dtype: str
    numel: int
    device: int
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


@dataclass(frozen=True)
class Handle:
    """Mirror of `respec.messages.WeightsHandle` without msgspec (see `as_message`)."""

    kind: str
    location: str = ""
    backend: str = ""
    specs: list[TensorSpec] = field(default_factory=list)
    buffers: list[IpcBuffer] = field(default_factory=list)
    version_tag: IpcBuffer | None = None


def as_message(handle: Handle) -> Any:
    """The `WeightsHandle` message struct for a handle built here (imports msgspec)."""
    from respec.messages.training import IpcBuffer as IpcBufferMsg
    from respec.messages.training import TensorSpec as TensorSpecMsg
    from respec.messages.training import WeightsHandle

    return WeightsHandle(kind=handle.kind, location=handle.location, backend=handle.backend,
                         specs=[TensorSpecMsg(**vars(s)) for s in handle.specs],
                         buffers=[IpcBufferMsg(**vars(b)) for b in handle.buffers],
                         version_tag=None if handle.version_tag is None else IpcBufferMsg(**vars(handle.version_tag)))


# ---------------------------------------------------------------------------- choosing


def choose_kind(setting: str, *, same_process: bool, same_host: bool, publisher_cuda: bool,
                receivers_cuda: bool) -> str:
    """The kind `run.weights: SETTING` resolves to for one publisher and its receivers.

    auto: local when every receiver shares the publisher's process, cuda_ipc between
    processes on one host when both sides are on CUDA, file otherwise."""
    if setting not in KINDS:
        raise ValueError(f"run.weights: {setting!r} is not one of {', '.join(KINDS)}")
    if setting != "auto":
        return setting
    if same_process:
        return "local"
    if same_host and publisher_cuda and receivers_cuda:
        return "cuda_ipc"
    return "file"


# ---------------------------------------------------------------------------- flat buffers


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightsTransferError(f"unknown dtype {name!r} in a weights handle")
    return dtype


def flatten(tensors: Mapping[str, torch.Tensor],
            into: list[torch.Tensor] | None = None) -> tuple[list[TensorSpec], list[torch.Tensor]]:
    """Copy the tensors into one flat buffer per dtype (in first-seen dtype order): new
    buffers, or `into` where it has the same dtypes and sizes (a publisher's reused ones)."""
    order: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        order.setdefault(tensor.dtype, []).append((name, tensor.detach()))
    sizes = [(dtype, sum(t.numel() for _, t in items)) for dtype, items in order.items()]
    if into is not None and _layout(into) != sizes:
        into = None  # another layout: new buffers
    specs, buffers = [], []
    for index, (dtype, items) in enumerate(order.items()):
        total = sizes[index][1]
        flat = into[index] if into is not None else torch.empty(total, dtype=dtype, device=items[0][1].device)
        offset = 0
        for name, tensor in items:
            flat[offset:offset + tensor.numel()].copy_(tensor.reshape(-1))
            specs.append(TensorSpec(name, str(dtype).removeprefix("torch."), list(tensor.shape), index, offset))
            offset += tensor.numel()
        buffers.append(flat)
    return specs, buffers


def _layout(buffers: list[torch.Tensor]) -> list[tuple[torch.dtype, int]]:
    """What a buffer set must match to be written over: each buffer's dtype and size."""
    return [(b.dtype, b.numel()) for b in buffers]


def copied_to(buffers: list[torch.Tensor], device: torch.device,
              into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The flat buffers copied to `device` (into `into` where its layout matches): one copy
    each, so a copy between GPUs is one peer transfer, not one per tensor."""
    if into is None or _layout(into) != _layout(buffers):
        into = [torch.empty(b.numel(), dtype=b.dtype, device=device) for b in buffers]
    for flat, out in zip(buffers, into, strict=True):
        out.copy_(flat)
    return into


def unflatten(specs: list[Any], buffers: list[torch.Tensor],
              names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Views of the named tensors into the flat buffers (no copy)."""
    out = {}
    for spec in specs:
        if names is not None and spec.name not in names:
            continue
        numel = 1
        for size in spec.shape:
            numel *= size
        out[spec.name] = buffers[spec.buffer][spec.offset:spec.offset + numel].view(list(spec.shape))
    return out


def _buffer_sizes(specs: list[Any]) -> list[tuple[torch.dtype, int]]:
    sizes: dict[int, tuple[torch.dtype, int]] = {}
    for spec in specs:
        numel = 1
        for size in spec.shape:
            numel *= size
        dtype, end = sizes.get(spec.buffer, (_dtype(spec.dtype), 0))
        sizes[spec.buffer] = (dtype, max(end, spec.offset + numel))
    return [sizes[i] for i in range(len(sizes))]


# In-process registry: a receiver in the publisher's own process reads the published
# buffers directly (it can neither open its own IPC handles nor join its own group).
_LOCAL: dict[str, tuple[int, list[torch.Tensor]]] = {}


# ---------------------------------------------------------------------------- cuda_ipc


def _require_cuda(kind: str) -> None:
    if not torch.cuda.is_available():
        raise WeightsTransferError(
            f"weights kind {kind!r} needs CUDA, and torch.cuda.is_available() is False here: "
            "set run.weights to auto, file or collective (gloo on the CPU)")


class CudaIpcPublisher:
    """Keeps the last `keep` versions' flat buffers alive and hands out their IPC handles.

    Once `keep` versions are kept, a new one is written into the oldest one's buffers: a
    CUDA block once shared over IPC is not given back to PyTorch's allocator while a
    receiver may hold it, so a new set per version held on to the set's size (2.5 GB for
    the 0.5B shape's float32 weights) more device memory with every version (measured on
    an H100). A receiver copies a version out as soon as its announcement arrives; one
    that fell `keep` versions behind would find a newer version in the buffers. So each
    set carries a version tag (one int64 on the device, shared like the buffers): -1 while
    the set is being written, then the version in it. A receiver reads it before copying
    (another version: SupersededWeights, nothing copied, the newer announcement follows)
    and after (changed during the copy: a WeightsTransferError, never a silent mix).

    `device`: the GPU the buffers live on when it is not the tensors' own, the one every
    receiver is on. The publisher then writes them across (one peer copy per buffer, from a
    staging set on its own GPU), and each receiver copies within its own GPU. A receiver
    that reads across GPUs runs those copies on the publisher's GPU instead (PyTorch copies
    between GPUs on the source's stream), where they wait behind the publisher's next
    kernels: on two H100s a third of FastRollouts' loads took 0.12-0.28 s, ending as the
    trainer's next update did, against ~0.015 s for the rest."""

    def __init__(self, keep: int = 3, device: str | torch.device | None = None) -> None:
        _require_cuda("cuda_ipc")
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self.device = None if device is None else torch.device(device)
        self.location = f"cuda_ipc-{uuid.uuid4().hex[:12]}"
        self.versions: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}  # version -> (buffers, tag)
        self.staging: list[torch.Tensor] | None = None  # on the tensors' GPU, when the buffers are on another

    def publish(self, tensors: Mapping[str, torch.Tensor], version: int) -> Handle:
        _check_on_cuda(tensors)
        source = next(iter(tensors.values())).device
        target = self.device or source
        buffers, tag = self.versions.pop(min(self.versions)) if len(self.versions) >= self.keep else (None, None)
        if tag is None:
            tag = torch.full((1,), -1, dtype=torch.int64, device=target)
        else:
            tag.fill_(-1)  # before the writes, on the same stream: a receiver still copying sees it change
        if target == source:
            specs, buffers = flatten(tensors, into=buffers)
        else:
            specs, self.staging = flatten(tensors, into=self.staging)
            buffers = copied_to(self.staging, target, into=buffers)
        tag.fill_(version)  # after the copies: PyTorch orders a copy between GPUs with both GPUs' streams
        _synchronize(tag.device)  # receivers read on their own streams
        self.versions[version] = (buffers, tag)
        _LOCAL[self.location] = (version, buffers)
        return Handle(kind="cuda_ipc", location=self.location, specs=specs, buffers=[_share(flat) for flat in buffers],
                      version_tag=_share(tag))


def _check_on_cuda(tensors: Mapping[str, torch.Tensor]) -> None:
    if any(not t.is_cuda for t in tensors.values()):
        raise WeightsTransferError("cuda_ipc weights must be CUDA tensors; this publisher has CPU tensors")


def _synchronize(device: torch.device | None = None) -> None:
    torch.cuda.synchronize(device)


def _share(flat: torch.Tensor) -> IpcBuffer:
    """A CUDA tensor's IPC handle, as torch.multiprocessing's reduce_tensor gives it."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    if len(args) != 15:
        raise WeightsTransferError(f"torch {torch.__version__}: unexpected reduce_tensor layout ({len(args)})")
    (_, _, _, _, _, dtype, device, handle, size, offset, _, ref_handle, ref_offset, event, sync) = args
    return IpcBuffer(str(dtype).removeprefix("torch."), flat.numel(), int(device), bytes(handle), int(size),
                     int(offset), bytes(ref_handle), int(ref_offset), None if event is None else bytes(event),
                     bool(sync))


def _tagged_version(handle: Any) -> int | None:
    """The version in a cuda_ipc handle's buffers now (None: a handle without a tag)."""
    if handle.version_tag is None:
        return None
    return int(_open_ipc(handle.version_tag).item())


def _open_ipc(buffer: Any) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(torch.Tensor, (buffer.numel,), (1,), 0, torch.UntypedStorage, _dtype(buffer.dtype),
                               buffer.device, buffer.handle, buffer.storage_size, buffer.storage_offset, False,
                               buffer.ref_counter_handle, buffer.ref_counter_offset, buffer.event_handle,
                               buffer.event_sync_required)


# ---------------------------------------------------------------------------- collective


def _group(store: Any, rank: int, size: int, backend: str, device: torch.device, host: str,
           timeout_s: float) -> Any:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore("group", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, size, options)
    if backend == "nccl":
        _require_cuda("collective (nccl)")
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    raise WeightsTransferError(f"collective weights: unknown backend {backend!r} (nccl or gloo)")


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    group.broadcast([tensor], options).wait()


def _address(location: str) -> tuple[str, int]:
    if not location.startswith("tcp://"):
        raise WeightsTransferError(f"collective weights: location {location!r} is not tcp://HOST:PORT")
    host, _, port = location.removeprefix("tcp://").rpartition(":")
    return host, int(port)


class CollectivePublisher:
    """Rank 0 of a group with `receivers` other processes; broadcasts each version.

    The store listens at once (its address is every handle's location); the group is
    formed and every broadcast runs on a background thread, so `publish` returns while
    receivers are still joining. At most `depth` versions wait for their broadcast;
    `publish` blocks beyond that (back-pressure, no version skipped)."""

    def __init__(self, receivers: int, backend: str = "", device: str | torch.device = "cpu",
                 host: str = "127.0.0.1", timeout_s: float = 300.0, depth: int = 2) -> None:
        import torch.distributed as dist

        if receivers < 1:
            raise ValueError("a collective publisher needs at least one receiving process")
        self.device = torch.device(device)
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if self.backend == "nccl":
            _require_cuda("collective (nccl)")
        self.receivers, self.host, self.timeout_s = receivers, host, timeout_s
        self.store = dist.TCPStore(host, 0, receivers + 1, True, datetime.timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        self.store.set("weights/world_size", str(receivers + 1))
        self.location = f"tcp://{host}:{self.store.port}"
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.sent = 0  # versions broadcast so far
        self.thread = threading.Thread(target=self._run, name="weights-broadcast", daemon=True)
        self.thread.start()

    def publish(self, tensors: Mapping[str, torch.Tensor], version: int) -> Handle:
        if self.error is not None:
            raise WeightsTransferError(f"collective weights: the broadcast failed: {self.error}") from self.error
        specs, buffers = flatten({k: t.to(self.device) for k, t in tensors.items()})
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the thread broadcasts on its own stream
        _LOCAL[self.location] = (version, buffers)
        self.jobs.put((version, buffers))
        return Handle(kind="collective", location=self.location, backend=self.backend, specs=specs)

    def flush(self) -> None:
        """Wait until every published version has been broadcast."""
        self.jobs.join()
        if self.error is not None:
            raise WeightsTransferError(f"collective weights: the broadcast failed: {self.error}") from self.error

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            group = _group(self.store, 0, self.receivers + 1, self.backend, self.device, self.host, self.timeout_s)
        except BaseException as error:  # noqa: BLE001 (reported on the next publish)
            self.error = error
            group = None
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if group is None:
                    continue
                version, buffers = job
                _broadcast(group, torch.tensor([version, len(buffers)], dtype=torch.int64, device=self.device))
                for flat in buffers:
                    _broadcast(group, flat)
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                self.sent += 1
            except BaseException as error:  # noqa: BLE001
                self.error = error
                group = None
            finally:
                self.jobs.task_done()


class _CollectiveReceiver:
    """This process's membership of one publisher's group (every actor here shares it)."""

    def __init__(self, location: str, backend: str, device: torch.device, timeout_s: float) -> None:
        import torch.distributed as dist

        host, port = _address(location)
        self.store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
        size = _world_size(self.store, timeout_s)
        self.rank = rank = self.store.add("weights/next_rank", 1)
        if rank >= size:
            raise WeightsTransferError(f"collective weights at {location}: more receiving processes than the "
                                       f"publisher expects ({size - 1})")
        self.backend = backend
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.group = _group(self.store, rank, size, backend, self.device, host, timeout_s)

    def receive(self, specs: list[Any], version: int) -> list[torch.Tensor]:
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        _broadcast(self.group, header)
        got, count = int(header[0]), int(header[1])
        if got != version:
            raise WeightsTransferError(f"collective weights: expected version {version}, the publisher broadcast "
                                       f"{got} (every receiving process must take every version, in order)")
        sizes = _buffer_sizes(specs)
        if count != len(sizes):
            raise WeightsTransferError(f"collective weights: {count} buffers broadcast, the handle names {len(sizes)}")
        buffers = [torch.empty(numel, dtype=dtype, device=self.device) for dtype, numel in sizes]
        for flat in buffers:
            _broadcast(self.group, flat)
        return buffers


def _world_size(store: Any, timeout_s: float) -> int:
    store.wait(["weights/world_size"], datetime.timedelta(seconds=timeout_s))
    return int(store.get("weights/world_size"))


_RECEIVERS: dict[str, _CollectiveReceiver] = {}
_RECEIVED: dict[str, tuple[int, list[torch.Tensor]]] = {}
_RECEIVE_LOCK = threading.Lock()


def _receive_collective(handle: Any, version: int, device: torch.device, timeout_s: float) -> list[torch.Tensor]:
    with _RECEIVE_LOCK:
        local = _LOCAL.get(handle.location)
        if local is not None and local[0] == version:  # the publisher's own process
            return local[1]
        cached = _RECEIVED.get(handle.location)
        if cached is not None and cached[0] == version:  # another actor of this process took it
            return cached[1]
        if cached is not None and cached[0] > version:
            raise WeightsTransferError(f"collective weights: version {version} is older than the one this process "
                                       f"already received ({cached[0]})")
        receiver = _RECEIVERS.get(handle.location)
        if receiver is None:
            receiver = _RECEIVERS[handle.location] = _CollectiveReceiver(handle.location, handle.backend, device,
                                                                         timeout_s)
        buffers = receiver.receive(list(handle.specs), version)
        _RECEIVED[handle.location] = (version, buffers)
        return buffers


# ---------------------------------------------------------------------------- receiving


def receive(handle: Any, version: int, names: tuple[str, ...] | None = None, device: str | torch.device = "cpu",
            timeout_s: float = 300.0) -> dict[str, torch.Tensor]:
    """The tensors a cuda_ipc or collective handle points at, as views (copy them out with
    `copy_`/`load_state_dict`; for cuda_ipc use `opened` so the mapping is released after)."""
    if handle.kind == "cuda_ipc":
        _require_cuda("cuda_ipc")
        local = _LOCAL.get(handle.location)
        if local is not None:  # the publisher is in this process
            if local[0] != version:
                raise SupersededWeights(f"cuda_ipc weights v{version}: this process published v{local[0]} since")
            return unflatten(list(handle.specs), local[1], names)
        try:
            buffers = [_open_ipc(buffer) for buffer in handle.buffers]
            tagged = _tagged_version(handle)
        except RuntimeError as error:
            raise WeightsTransferError(f"cuda_ipc weights v{version}: cannot map the publisher's buffers ({error}); "
                                       "it keeps only its last few versions, or it sits on another host") from error
        if tagged is not None and tagged != version:
            raise SupersededWeights(f"cuda_ipc weights v{version}: the publisher has written "
                                    f"{'v' + str(tagged) if tagged >= 0 else 'a newer version'} into its buffers "
                                    "since (it keeps run.weights_keep versions); the newer announcement follows")
        return unflatten(list(handle.specs), buffers, names)
    if handle.kind == "collective":
        buffers = _receive_collective(handle, version, torch.device(device), timeout_s)
        return unflatten(list(handle.specs), buffers, names)
    raise WeightsTransferError(f"weights_transfer.receive: kind {handle.kind!r} is read by the actors themselves")


@contextlib.contextmanager
def opened(handle: Any, version: int, names: tuple[str, ...] | None = None,
           device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """`receive`, then (cuda_ipc) wait for the copies out of the mapped buffers before
    they are unmapped."""
    tensors = receive(handle, version, names, device)
    try:
        yield tensors
    finally:
        if handle.kind == "cuda_ipc":
            _synchronize()  # the copies out ran before the mapping goes
        tensors.clear()
    # Reached only when the copies succeeded: did the publisher write the buffers meanwhile?
    # (In its own process a receiver reads them between publishes, never during one.)
    if handle.kind == "cuda_ipc" and handle.location not in _LOCAL:
        tagged = _tagged_version(handle)
        if tagged is not None and tagged != version:
            raise TornWeights(
                f"cuda_ipc weights v{version}: the publisher wrote a newer version into the buffers while they "
                "were being copied out, so the copy may mix two versions; raise run.weights_keep")
