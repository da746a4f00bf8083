"""Which way a publisher's weight announcements travel, read off the run's plan.

`run.weights` (docs/RUNTIME.md, "Weights across devices") is resolved per publisher: the
PolicyTrainer for PolicyWeights, the CapturedDistiller for DraftWeights. Both ask the same
questions of the plan: which receivers load the tensors, on what devices, in which
processes, and which one GPU (if any) the cuda_ipc buffers should live on.
"""

from __future__ import annotations

import torch

from respec.engine.devices import gpu_of
from respec.runtime import weights_transfer


def loaders(plan, message: type) -> list[str]:
    """The receivers of `message` that load its tensors (Actor.reads_weights): the
    PromptSource reads only PolicyWeights' version. Counting it made every GPU run fall
    back to files, 1-2 s of each update's time on an H100."""
    return [name for name in plan.handlers_of(message) if plan.actors[name].cls.reads_weights]


def loader_devices(plan, message: type) -> list[str]:
    """Each loader's device setting (its own, else the model's)."""
    return [str(plan.actors[name].spec.params.get("device", plan.config.model.device))
            for name in loaders(plan, message)]


def loaders_on_cuda(plan, message: type) -> bool:
    devices = loader_devices(plan, message)
    return bool(devices) and all(device.startswith("cuda") for device in devices)


def receivers_gpu(plan, message: type, publisher: torch.device) -> torch.device | None:
    """The one GPU every loader off the publisher's GPU is on: the cuda_ipc buffers are put
    there (weights_transfer.CudaIpcPublisher says why), and a loader on the publisher's GPU
    (a distiller beside the trainer) reads across instead. None where there is no such GPU."""
    devices = {gpu_of(device) for device in loader_devices(plan, message)} - {gpu_of(str(publisher))}
    if len(devices) != 1 or None in devices:
        return None
    return next(iter(devices))


def all_in_group(plan, message: type, group: str) -> bool:
    """Whether every receiver of `message` (loading or not) is in the publisher's process."""
    return all(plan.actors[name].spec.group == group for name in plan.handlers_of(message))


def kind(plan, message: type, group: str, publisher: torch.device) -> str:
    """`run.weights` for this publisher (auto: local in one process, cuda_ipc on one host
    with CUDA on both sides, else file)."""
    run = plan.config.run
    return weights_transfer.choose_kind(run.weights, same_process=all_in_group(plan, message, group),
                                        same_host=run.placement == "local", publisher_cuda=publisher.type == "cuda",
                                        receivers_cuda=loaders_on_cuda(plan, message))
