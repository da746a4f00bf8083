"""CapturedDistiller: online distillation of the EAGLE head from the trainer's own pass.

The DraftDistiller keeps a policy copy and recomputes the target from tokens, in a process
of its own. On a GPU shared with the trainer that costs the trainer 25-40% of its update
at any update rate tried: two processes' kernels time-slice one GPU (docs/PERFORMANCE.md).
This actor lives in the trainer's process group instead: for every micro-batch of every
GRPO update the PolicyTrainer sends `CapturedTargets`, the features and logits its forward
pass computed anyway (by reference, on its device), and the head learns from them:

- each message adds its reward-weighted KL(target || draft) gradient (EAGLE-3's
  training-time test over `unroll` drafting steps) to the head's gradients: one head
  forward and backward, no target pass;
- when a message of a version `update_interval` past the last update arrives, the
  accumulated gradient (its mean over the messages) takes one AdamW step. Before and
  after that step, expected acceptance (`captured_acceptance`) is measured on that
  message's rollouts, which no step has seen yet, and `DraftWeights(version)` is
  published for the Generator.

The head's work runs on the device's one stream, its kernels queued behind the trainer's,
from a worker thread of its own (`worker_thread`). Run in the handler, they held the event
loop the trainer shares, and its next update waited: on two H100s (0abbfeb) the distiller
cost 0.013-0.025 s a step over SD alone at 8-24 rollouts a message, nearly independent of
the rows, which is what launch-bound host work looks like at the 0.5B shape. From the
thread the launches can overlap the trainer's update, which spends most of its time
waiting on the GPU with the GIL released (not yet measured there). Messages are still
learnt from one at a time, in order (the handler awaits the thread). The head's target
parts (embedding, final norm, lm_head) follow the policy through the copies each message
carries.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import torch

from respec.engine.checkpoint import load_model
from respec.engine.devices import bf16_autocast, use_device
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleHead, distill_loss, layers_to_capture
from respec.messages import CapturedTargets, DraftWeights, Envelope, WeightsHandle
from respec.rl.distill import Sequence, captured_acceptance, param_problems, sample_weights
from respec.runtime import Actor, handles
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
        # Distil from at most this many rollouts of each message, chosen at random (0: all):
        # bounds the head's work per trainer update. bench/gpu_rl.py's 0.39x run used ~21 a
        # version; 128 took ~0.2 s a version on an H100 beside a ~0.2 s update (597254b).
        max_rows: int = 0
        eval_shape: str = "s4_t1_n4"  # its depth: the chain length of the acceptance measure
        heldout_temperature: float = 1.0  # of the acceptance measure (RL's sampling; 0: greedy)
        weights_dir: str = ""
        seed: int = 0
        device: str = "cpu"  # the trainer's: the captured tensors are there
        # The head's work in a thread of its own (the module docstring says why); False: in
        # the handler, on the event loop (its only way until 0abbfeb: 0.54-0.61x there).
        worker_thread: bool = True

    sends = (DraftWeights,)

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        problems = param_problems(params, ("update_interval", "unroll"))
        if params.max_rows < 0:
            problems.append(f"params.max_rows must be >= 0, got {params.max_rows}")
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
        self.pending = 0  # messages whose gradient is accumulated
        self.losses: list[torch.Tensor] = []  # their losses, read at the update (no sync per message)
        self.weight_files = WeightFiles(self.params.weights_dir, "respec-draft-", keep=2)
        # One thread, so messages are learnt from in order; made current on the device, as
        # CUDA's current device is per thread.
        self.worker = (ThreadPoolExecutor(1, "captured-distiller", initializer=use_device,
                                          initargs=(self.params.device,)) if self.params.worker_thread else None)

    async def on_stop(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.worker.shutdown(wait=True)  # a message's work in flight ends before its files go
        if hasattr(self, "weight_files"):  # absent if the start failed
            self.weight_files.close()

    @handles(CapturedTargets)
    async def on_captured(self, captured: CapturedTargets, envelope: Envelope) -> None:
        if self.worker is None:
            update = self._learn(captured)
        else:
            update = await asyncio.get_running_loop().run_in_executor(self.worker, self._learn, captured)
        if update is not None:
            await self._publish(*update)

    def _learn(self, captured: CapturedTargets) -> tuple[dict, dict] | None:
        """The message's gradient, after one update first if one is due (then returned: the
        head's tensors to publish and the metrics row)."""
        if captured.parts:
            self.policy.load_state_dict(captured.parts, strict=False)
        update = None
        if self.pending and captured.policy_version - self.updated_at >= self.params.update_interval:
            update = self._update(captured)
        self._accumulate(captured)
        return update

    def _accumulate(self, captured: CapturedTargets) -> None:
        rows = [Sequence([], 0, float(r), g, captured.policy_version)
                for r, g in zip(np.asarray(captured.rewards).tolist(), captured.groups, strict=True)]
        weights = sample_weights(rows, rows, self.params.reward_weighting)  # against all the message's rewards
        keep = self._chosen_rows(len(rows))
        index = keep.to(captured.tokens.device)
        self.head.train()
        # bf16 on a GPU, as bench/gpu_train.py trains heads (in fp32 the held-out measure alone
        # took 0.084 s an update against 0.023 s, 72b6d2b and 0abbfeb on two H100s)
        with bf16_autocast(self.device):
            loss = distill_loss(self.head, captured.features[index].float(), captured.tokens[index],
                                captured.logits[index].float(), weights=weights[keep].to(self.device),
                                valid=captured.valid[index], steps=self.params.unroll)
        loss.backward()
        self.head.eval()
        self.losses.append(loss.detach())
        self.pending += 1

    def _chosen_rows(self, count: int) -> torch.Tensor:
        if not self.params.max_rows or count <= self.params.max_rows:
            return torch.arange(count)
        return torch.randperm(count, generator=self.rng)[: self.params.max_rows].sort().values

    def _update(self, heldout: CapturedTargets) -> tuple[dict, dict]:
        """One AdamW step on the mean of the accumulated gradients, between two measurements
        on `heldout` (rollouts no step has seen); returns the new head's tensors (host
        copies) and the metrics row."""
        started = time.perf_counter()
        before = self._acceptance(heldout)
        heldout_s = time.perf_counter() - started
        for parameter in self.head.parameters():
            if parameter.grad is not None:
                parameter.grad /= self.pending
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.params.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        measured = time.perf_counter()
        after = self._acceptance(heldout)
        heldout_s += time.perf_counter() - measured
        kl, messages = float(torch.stack(self.losses).mean()), self.pending
        self.losses, self.pending = [], 0
        self.version += 1
        self.updated_at = heldout.policy_version
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        row = dict(step=heldout.policy_version, draft_version=self.version, distill_kl=kl,
                   heldout_accept_before=before, heldout_accept_after=after,
                   distill_s=time.perf_counter() - started, distill_heldout_s=heldout_s, distill_messages=messages)
        return state, row

    async def _publish(self, state: dict, row: dict) -> None:
        """The head as a file (the Generator is in another process), written in a thread
        either way so that the trainer's loop is not held, then announced."""
        path = await asyncio.to_thread(self.weight_files.save, f"draft-v{row['draft_version']}", state)
        await self.send(DraftWeights(version=row["draft_version"], handle=WeightsHandle(kind="file", location=str(path)),
                                     heldout_accept_before=row["heldout_accept_before"],
                                     heldout_accept_after=row["heldout_accept_after"], distill_s=row["distill_s"]),
                        draft_version=row["draft_version"])
        self.report(row.pop("step"), **row)

    def _acceptance(self, captured: CapturedTargets) -> float:
        total, roots = captured_acceptance(self.head, captured.features, captured.tokens, captured.logits,
                                           captured.valid, captured.response_starts, self.draft_len,
                                           self.params.heldout_temperature)
        return total / roots if roots else 0.0
