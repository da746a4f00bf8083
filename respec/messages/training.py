"""Messages of the learning path: scored rollouts, distillation samples, weights."""

from __future__ import annotations

import msgspec

from respec.messages.arrays import Array
from respec.messages.base import Channel, Message
from respec.messages.generation import Rollout


class ScoredRollout(Message, frozen=True):
    """RewardScorer -> PolicyTrainer: a rollout with its reward."""

    rollout: Rollout
    reward: float
    correct: bool  # the checker's verdict, for accuracy metrics
    error: str = ""  # a checker that raised or timed out: reward is 0 and this says why
    received_at: float = 0.0  # wall clock when the RewardScorer got the rollout (generation ended)
    score_s: float = 0.0  # time the checker took


class DistillSample(Message, frozen=True):
    """RewardScorer -> DraftDistiller: what the drafter learns from one rollout."""

    prompt_id: str
    policy_version: int  # version of the policy whose distribution is the target
    tokens: Array  # int32 [T] prompt + response
    response_start: int  # index in tokens where the response begins
    features: Array | None = None  # [T, F] target features the drafter reads
    target_probs_topk: Array | None = None  # float32 [T, K] target distribution, top-K
    target_ids_topk: Array | None = None  # int32 [T, K]
    reward: float = 0.0
    advantage: float = 0.0


class CapturedTargets(Message, frozen=True):
    """PolicyTrainer -> a distiller in its process (CapturedDistiller): what one micro-batch
    of the GRPO update's forward pass computed over the step's rollouts, so the head learns
    from it with no target pass of its own. The tensors stay on the trainer's device and
    travel by reference, so the receiver must share the trainer's process group."""

    policy_version: int  # of the weights that computed it: those before the update
    layers: list[int]  # the captured layers, in the order of `features`
    tokens: Array  # long [B, L] prompt + response, right-padded
    valid: Array  # bool [B, L] the real tokens
    response_starts: Array  # long [B] where each row's response begins
    features: Array  # [B, L, layers * hidden] hidden states after `layers`, concatenated
    logits: Array  # [B, L, V] the policy's raw logits (no temperature)
    rewards: Array  # float32 [B]
    groups: list[str]  # each row's GRPO group
    # The policy's tensors the head reads (embedding, final norm, lm_head), copied after the
    # update: the head drafts for the new version, and the trainer's own are updated in place.
    parts: dict[str, Array] = {}


class TensorSpec(msgspec.Struct, frozen=True):
    """One named tensor inside a flat buffer of a "cuda_ipc" or "collective" handle."""

    name: str
    dtype: str  # "bfloat16", "float32", ...
    shape: list[int]
    buffer: int  # index of the flat buffer (one per dtype)
    offset: int  # in elements


class IpcBuffer(msgspec.Struct, frozen=True):
    """One flat CUDA buffer shared by CUDA IPC (torch's reduce_tensor fields; same host only)."""

    dtype: str
    numel: int
    device: int
    handle: bytes  # cudaIpcMemHandle
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


class WeightsHandle(msgspec.Struct, frozen=True):
    """Where a weight set lives; the announcement never carries the bytes over a socket.

    kind (respec/runtime/weights_transfer.py, docs/RUNTIME.md "Weights across devices"):
    "local" (tensors by reference, same process), "file" (a safetensors file),
    "cuda_ipc" (one flat CUDA buffer per dtype, kept alive by the publisher; `buffers`
    holds their IPC handles, `specs` where each tensor sits), "collective" (a
    torch.distributed broadcast: `location` is the group's TCP store tcp://HOST:PORT,
    `backend` "nccl" or "gloo", `specs` the layout). "shm" is reserved, not built.
    The IPC handles and the manifest ride in the message body (msgpack bytes, a few
    hundred bytes per buffer and ~60 per tensor): no extra frames to keep in step.
    """

    kind: str
    location: str = ""  # file path, IPC publisher id or tcp:// store address
    tensors: dict[str, Array] | None = None  # kind "local" only
    backend: str = ""  # kind "collective": "nccl" | "gloo"
    specs: list[TensorSpec] = []  # kinds "cuda_ipc" and "collective"
    buffers: list[IpcBuffer] = []  # kind "cuda_ipc"
    version_tag: IpcBuffer | None = None  # kind "cuda_ipc": the version now in `buffers` (-1 while written)


class PolicyWeights(Message, frozen=True):
    """PolicyTrainer -> Verifier (and Generator): a new policy version to swap in."""

    channel = Channel.BROADCAST
    version: int
    handle: WeightsHandle
    trained_groups: list[int] = []  # the prompt groups this update trained on (data position)


class DraftWeights(Message, frozen=True):
    """DraftDistiller -> Generator: a new drafter version to swap in."""

    channel = Channel.BROADCAST
    version: int
    handle: WeightsHandle
    heldout_accept_before: float = 0.0  # held-out acceptance length before the update
    heldout_accept_after: float = 0.0  # and after it
    distill_s: float = 0.0  # seconds the update took (measurements included)
