"""CapturedDistiller: online distillation of the EAGLE head from the trainer's own pass.

The DraftDistiller keeps a policy copy and recomputes the target from tokens, in a process
of its own. On a GPU shared with the trainer that costs the trainer 25-40% of its update
at any update rate tried: two processes' kernels time-slice one GPU (docs/PERFORMANCE.md).
This actor lives in the trainer's process group instead: for every micro-batch of every
GRPO update the PolicyTrainer sends `CapturedTargets`, the features and logits its forward
pass computed anyway (by reference, on its device), and the head learns from them:

- each message's rows (up to `max_rows`, with their reward weights) are kept on the
  device until the next update;
- when a message of a version `update_interval` past the last update arrives, the kept
  rows are learnt from in one head forward and backward (reward-weighted KL(target ||
  draft), EAGLE-3's training-time test over `unroll` drafting steps: no target pass) and
  one AdamW step is taken. Before and after that step, expected acceptance
  (`captured_acceptance`) is measured on the arriving message's rows, which no step has
  seen yet, and `DraftWeights(version)` is published for the Generator. Those rows are
  then kept for the next update.

The head's work runs on the device's one stream, its kernels queued behind the trainer's,
from a worker thread of its own (`worker_thread`), so that it does not hold the event loop
the trainer shares. The rows of an update's messages are learnt from together, one pass
for I messages (until they hold `kept_mb`: at a real vocabulary the logits are large; then
they are learnt from early, the gradient kept), since at the 0.5B shape a head pass is
launch-bound host work. On two H100s neither the thread (a4e6835: 0.67x the sync no-SD
step against 0.68x in the handler) nor the one pass (504160d: 0.66x) changed the step;
the updates were the cost: about 0.1 s of step time each, against 0.012 s a step for the
capture and the kept rows (docs/PERFORMANCE.md). The new head goes to the Generator as
`run.weights` resolves it (cuda_ipc onto its GPU where it can; `_published`). The head's
target parts (embedding, final norm, lm_head) follow the policy through the copies each
message carries.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import torch

from respec.engine.checkpoint import load_model
from respec.engine.devices import bf16_autocast, use_device
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleHead, distill_loss, layers_to_capture
from respec.messages import CapturedTargets, DraftWeights, Envelope, WeightsHandle
from respec.rl.distill import Sequence, captured_acceptance, param_problems, sample_weights
from respec.runtime import Actor, handles, weights_route, weights_transfer
from respec.runtime.device_thread import DeviceThread
from respec.runtime.weight_files import WeightFiles


class CapturedDistiller(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str  # the policy: its config, and the parts the head reads until messages bring newer ones
        draft_path: str = ""  # the head to start from ("": a fresh one)
        update_interval: int = 1  # I: one optimizer step after every I policy versions
        reward_weighting: str = "reward"  # none | reward | advantage (within each message's rollouts)
        lr: float = 5e-5  # see DraftDistiller.Params.lr: a good head wants small steps
        max_grad_norm: float = 1.0
        unroll: int = 4  # drafting steps trained per position
        # Distil from, and measure held-out acceptance on, at most this many rollouts of each
        # message, chosen at random (0: all): bounds the head's work per trainer update.
        # bench/gpu_rl.py's 0.39x run used ~21 a version; 128 took ~0.2 s a version on an
        # H100 beside a ~0.2 s update (597254b).
        max_rows: int = 0
        eval_shape: str = "s4_t1_n4"  # its depth: the chain length of the acceptance measure
        heldout_temperature: float = 1.0  # of the acceptance measure (RL's sampling; 0: greedy)
        weights_dir: str = ""
        seed: int = 0
        device: str = "cpu"  # the trainer's: the captured tensors are there
        # The head's work in a thread of its own (the module docstring says why); False: in
        # the handler, on the event loop (its only way until 0abbfeb: 0.54-0.61x there).
        worker_thread: bool = True
        # The kept rows (features and logits of max_rows rollouts a message) are learnt from
        # ahead of the update once they hold this many MB (0: each message at once, as before
        # 504160d). 24 rows of 256 tokens at the 0.5B shape: ~20-40 MB of features with the
        # built-in vocabulary; Qwen2.5's 152k-token logits add ~2-4 GB.
        kept_mb: float = 1024.0

    sends = (DraftWeights,)

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        problems = param_problems(params, ("update_interval", "unroll"))
        if params.max_rows < 0 or params.kept_mb < 0:
            problems.append(f"params.max_rows and params.kept_mb must be >= 0, got {params.max_rows}, "
                            f"{params.kept_mb}")
        group = plan.actors[name].spec.group
        apart = sorted(s for s in plan.senders_of(CapturedTargets) if plan.actors[s].spec.group != group)
        if apart:
            problems.append(f"must share a process group with {', '.join(apart)} (group "
                            f"{plan.actors[apart[0]].spec.group!r}): CapturedTargets hold device tensors, "
                            f"passed by reference within one process")
        for sender in plan.senders_of(CapturedTargets):
            device = str(plan.actors[sender].spec.params.get("device", plan.config.model.device))
            if device != params.device:
                problems.append(f"params.device {params.device!r} must be {sender}'s ({device!r}): the captured "
                                f"tensors stay where the trainer computed them")
        return problems

    async def on_start(self) -> None:
        torch.manual_seed(self.params.seed)
        self.device = use_device(self.params.device)
        self.policy = load_model(Path(self.params.model_path), device=self.device, decoder_layers=False)  # never runs a layer
        self.head = (EagleHead.load(self.params.draft_path, self.policy) if self.params.draft_path
                     else EagleHead.for_target(self.policy)).eval()
        expected = layers_to_capture(self.policy.config)  # what the PolicyTrainer captures
        if tuple(self.head.capture_layers) != tuple(expected):
            raise ValueError(f"the head at {self.params.draft_path!r} reads layers {list(self.head.capture_layers)}; "
                             f"the trainer captures {list(expected)} (layers_to_capture of the policy)")
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.params.lr)
        self.draft_len = DraftShape.parse(self.params.eval_shape).steps
        self.rng = torch.Generator().manual_seed(self.params.seed)
        self.version = 0  # of the head
        self.updated_at = 0  # the policy version of the last update
        self.kept: list[KeptRows] = []  # rows not yet learnt from
        self.messages = 0  # since the last update
        self.rows_learnt = 0  # since the last update: their gradient is accumulated
        self.losses: list[torch.Tensor] = []  # their summed losses, read at the update (no sync before)
        self.keep_s = 0.0  # seconds spent keeping messages' rows since the last update
        self.weight_files = WeightFiles(self.params.weights_dir, "respec-draft-", keep=2)
        self.weights_kind = self._weights_kind()
        self.publisher = None
        if self.weights_kind == "cuda_ipc":  # the buffers on the Generator's GPU, as the trainer's (dcb407e)
            self.publisher = weights_transfer.CudaIpcPublisher(
                keep=self.context.plan.config.run.weights_keep,
                device=weights_route.receivers_gpu(self.context.plan, DraftWeights, self.device))
        # One thread, so messages are learnt from in order
        self.worker = DeviceThread("captured-distiller", self.params.device, enabled=self.params.worker_thread)

    def _weights_kind(self) -> str:
        """`run.weights` for the head (as the PolicyTrainer resolves it for the policy), except
        that a head, tens of MB, travels by file where the setting asks for a collective or
        for local references to a receiver in another process."""
        plan, group = self.context.plan, self.context.group.name
        kind = weights_route.kind(plan, DraftWeights, group, self.device)
        if kind == "collective" or (kind == "local" and not weights_route.all_in_group(plan, DraftWeights, group)):
            return "file"
        return kind

    async def on_stop(self) -> None:
        if hasattr(self, "worker"):
            self.worker.close()  # a message's work in flight ends before its files go
        if hasattr(self, "weight_files"):  # absent if the start failed
            self.weight_files.close()

    @handles(CapturedTargets)
    async def on_captured(self, captured: CapturedTargets, envelope: Envelope) -> None:
        update = await self.worker.run(self._learn, captured)
        if update is not None:
            await self._publish(*update)

    def _learn(self, captured: CapturedTargets) -> tuple[WeightsHandle | dict, dict] | None:
        """The message's rows kept, after one update first if one is due, measured on those
        rows (then returned: the new head to publish and the metrics row)."""
        if captured.parts:
            self.policy.load_state_dict(captured.parts, strict=False)
        started = time.perf_counter()
        rows = self._rows_of(captured)
        self.keep_s += time.perf_counter() - started
        update = None
        if self.messages and captured.policy_version - self.updated_at >= self.params.update_interval:
            update = self._update(rows, captured.policy_version)
        started = time.perf_counter()
        self._keep(rows)
        self.keep_s += time.perf_counter() - started
        return update

    def _rows_of(self, captured: CapturedTargets) -> KeptRows:
        """The message's `max_rows` rows (at random; all if 0), on the device, with their
        reward weights (normalised against all the message's rewards)."""
        rows = [Sequence([], 0, float(r), g, captured.policy_version)
                for r, g in zip(np.asarray(captured.rewards).tolist(), captured.groups, strict=True)]
        weights = sample_weights(rows, rows, self.params.reward_weighting)
        keep = self._chosen_rows(len(rows))
        index = keep.to(captured.tokens.device)
        return KeptRows(captured.features[index], captured.tokens[index], captured.logits[index],
                        captured.valid[index], weights[keep].to(self.device), captured.response_starts[index])

    def _keep(self, rows: KeptRows) -> None:
        self.kept.append(rows)
        self.messages += 1
        if sum(kept.nbytes for kept in self.kept) > self.params.kept_mb * 2**20:
            self._learn_kept()

    def _learn_kept(self) -> None:
        """One head forward and backward over the kept rows, its gradient added to the head's
        (scaled by the rows, so that the update's mean is over rows, however they came)."""
        if not self.kept:
            return
        rows = KeptRows.joined(self.kept)
        self.head.train()
        # bf16 on a GPU, as bench/gpu_train.py trains heads (in fp32 the held-out measure alone
        # took 0.084 s an update against 0.023 s, 72b6d2b and 0abbfeb on two H100s)
        with bf16_autocast(self.device):
            loss = distill_loss(self.head, rows.features.float(), rows.tokens, rows.logits.float(),
                                weights=rows.weights, valid=rows.valid, steps=self.params.unroll)
        count = rows.tokens.shape[0]
        (loss * count).backward()
        self.head.eval()
        self.losses.append(loss.detach() * count)
        self.rows_learnt += count
        self.kept = []

    def _chosen_rows(self, count: int) -> torch.Tensor:
        if not self.params.max_rows or count <= self.params.max_rows:
            return torch.arange(count)
        return torch.randperm(count, generator=self.rng)[: self.params.max_rows].sort().values

    def _update(self, heldout: KeptRows, version: int) -> tuple[WeightsHandle | dict, dict]:
        """One AdamW step on the mean of the accumulated gradients, between two measurements
        on `heldout` (rows of version `version`'s message, which no step has seen: the rows
        the next update learns from, so the measure costs no more than they do); returns
        the new head (`_published`) and the metrics row."""
        started = time.perf_counter()
        self._learn_kept()
        measured = time.perf_counter()
        before = self._acceptance(heldout)
        heldout_s = time.perf_counter() - measured
        for parameter in self.head.parameters():
            if parameter.grad is not None:
                parameter.grad /= self.rows_learnt
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.params.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        measured = time.perf_counter()
        after = self._acceptance(heldout)
        heldout_s += time.perf_counter() - measured
        kl, messages, keep_s = float(torch.stack(self.losses).sum()) / self.rows_learnt, self.messages, self.keep_s
        self.losses, self.messages, self.rows_learnt, self.keep_s = [], 0, 0, 0.0
        self.version += 1
        self.updated_at = version
        payload = self._published(self.version)
        row = dict(step=version, draft_version=self.version, distill_kl=kl,
                   heldout_accept_before=before, heldout_accept_after=after,
                   distill_s=time.perf_counter() - started, distill_heldout_s=heldout_s, distill_messages=messages,
                   distill_keep_s=keep_s)
        return payload, row

    def _published(self, version: int) -> WeightsHandle | dict[str, torch.Tensor]:
        """The new head as the Generator will load it: a handle, for local and cuda_ipc (made
        here, in the head's thread, where its copies queue behind the trainer's kernels), or
        host copies for `_publish` to write to a file."""
        state = {name: tensor.detach() for name, tensor in self.head.state_dict().items()}
        if self.weights_kind == "local":
            return WeightsHandle(kind="local", tensors={name: tensor.clone() for name, tensor in state.items()})
        if self.weights_kind == "cuda_ipc":
            return weights_transfer.as_message(self.publisher.publish(state, version))
        return {name: tensor.cpu().contiguous() for name, tensor in state.items()}

    async def _publish(self, payload: WeightsHandle | dict, row: dict) -> None:
        """The head announced; a file is written in a thread, in either mode, so that the
        trainer's loop is not held."""
        handle = payload
        if isinstance(payload, dict):
            path = await asyncio.to_thread(self.weight_files.save, f"draft-v{row['draft_version']}", payload)
            handle = WeightsHandle(kind="file", location=str(path))
        await self.send(DraftWeights(version=row["draft_version"], handle=handle,
                                     heldout_accept_before=row["heldout_accept_before"],
                                     heldout_accept_after=row["heldout_accept_after"], distill_s=row["distill_s"]),
                        draft_version=row["draft_version"])
        self.report(row.pop("step"), **row)

    def _acceptance(self, rows: KeptRows) -> float:
        total, roots = captured_acceptance(self.head, rows.features, rows.tokens, rows.logits, rows.valid,
                                           rows.response_starts, self.draft_len, self.params.heldout_temperature)
        return total / roots if roots else 0.0


class KeptRows(NamedTuple):
    """Rows of one or more messages, on the device, for the next update to learn from."""

    features: torch.Tensor  # [B, L, layers * hidden]
    tokens: torch.Tensor  # [B, L]
    logits: torch.Tensor  # [B, L, V]
    valid: torch.Tensor  # [B, L]
    weights: torch.Tensor  # [B] reward weights, normalised within each row's message
    response_starts: torch.Tensor  # [B] where each row's response begins

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self)

    @staticmethod
    def joined(parts: list[KeptRows]) -> KeptRows:
        """One batch of rows, right-padded to the longest (padding is not valid: no loss)."""
        if len(parts) == 1:
            return parts[0]
        length = max(part.tokens.shape[1] for part in parts)
        return KeptRows(*(_padded([part[field] for part in parts], length) for field in range(4)),
                        torch.cat([part.weights for part in parts]),
                        torch.cat([part.response_starts for part in parts]))


def _padded(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """[sum of B, length, ...]: the tensors stacked by rows, zeros past each one's length."""
    first = tensors[0]
    out = first.new_zeros((sum(t.shape[0] for t in tensors), length, *first.shape[2:]))
    row = 0
    for tensor in tensors:
        out[row: row + tensor.shape[0], : tensor.shape[1]] = tensor
        row += tensor.shape[0]
    return out
