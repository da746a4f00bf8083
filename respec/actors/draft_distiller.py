"""DraftDistiller: keeps the EAGLE head aligned with a policy that changes every step.

It buffers the RewardScorer's `DistillSample`s (tokens and reward of finished rollouts),
follows the policy through `PolicyWeights` (its own copy: the target distribution is
recomputed from tokens, never shipped), and every `update_interval` policy versions runs
`steps_per_update` steps of reward-weighted KL(target || draft) on the buffer. Before and
after each update it measures acceptance on held-out prompts (`heldout_measure`), then publishes
`DraftWeights(version)`, which the Generator swaps in between steps. The math lives in
respec/rl/distill.py.

CPU: distillation is background work. Where generation and training share the cores
with it (the 2-core CPU VM), each update's ~2 s of work was taken from them, and a full
respec run was slower than SD without it (docs/EXPERIMENTS.md). `nice` lowers the
priority of the distiller's process (it must be alone in its group; the plan check says
so), so the OS runs it on cycles generation and training leave idle; an update then
takes longer in wall time but does not slow the rollouts. On a GPU it runs on `device`
(e.g. beside the trainer on a second GPU; configs/gpu_fast.yaml).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import msgspec
import numpy as np
import torch

from respec.actors.generator import loaded_tensors
from respec.engine.checkpoint import load_model
from respec.engine.copy_in import copy_in
from respec.engine.devices import use_device
from respec.engine.drafters.base import DraftShape
from respec.engine.drafters.eagle import EagleHead
from respec.engine.tokenizer import load_tokenizer
from respec.messages import DistillSample, DraftWeights, Envelope, PolicyWeights, WeightsHandle
from respec.rl.distill import (
    HELDOUT_MEASURES,
    DistillBuffer,
    Sequence,
    distill_step,
    expected_acceptance,
    heldout_acceptance,
    param_problems,
    sample_weights,
)
from respec.runtime import Actor, handles
from respec.runtime.weight_files import WeightFiles
from respec.runtime.weights_transfer import SupersededWeights, TornWeights


class DraftDistiller(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str  # the policy at the start (its copy here follows PolicyWeights)
        draft_path: str = ""  # the head to start from ("": a fresh one)
        update_interval: int = 1  # I: update after every I new policy versions
        reward_weighting: str = "reward"  # none | reward | advantage
        buffer_size: int = 512  # rollouts kept (the oldest go first)
        heldout_prompts: int = 16  # the first distinct prompts, kept apart to measure acceptance
        steps_per_update: int = 8
        batch_size: int = 32
        # Small steps keep a good head good. A fresh AdamW's first steps move every weight by
        # about lr whatever its gradient, so lr should not exceed where the head's own training
        # ended by much: `respec prepare` ends at 1.5e-4; bench/gpu.py's heads at 5e-5, and
        # 3e-4 cost those 28% of their held-out acceptance in one update (docs/PERFORMANCE.md).
        lr: float = 3e-4
        unroll: int = 4  # drafting steps trained per position, as prepare trains (EAGLE-3's training-time test)
        min_buffer: int = 128  # no update before the buffer holds this many rollouts (a few would be memorised)
        # How held-out acceptance is measured before and after each update:
        # engine: greedy SD with the eager engine on the held-out prompts (the number a greedy
        #   Generator sees; hundreds of host-synchronised steps, seconds on a GPU shared with a
        #   trainer);
        # expected: tokens per step of chain SD with eval_shape's drafts at heldout_temperature
        #   (RL's sampling), estimated from one teacher-forced pass over the held-out prompts'
        #   rollouts (respec.rl.distill.expected_acceptance): no generation, a few kernels.
        heldout_measure: str = "engine"
        heldout_temperature: float = 1.0  # of `expected` (0: greedy)
        eval_shape: str = "s4_t1_n4"
        eval_max_new_tokens: int = 48
        weights_dir: str = ""
        seed: int = 0
        nice: int = 0  # added to its process's niceness at start (0-19): 19 runs it on idle cycles only
        device: str = "cpu"  # where its policy copy and head live and train ("cuda:1": beside a trainer there)

    sends = (DraftWeights,)

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        problems = param_problems(params, ("update_interval", "buffer_size", "steps_per_update", "batch_size",
                                           "min_buffer"))
        if params.heldout_measure not in HELDOUT_MEASURES:
            problems.append(f"params.heldout_measure must be one of {', '.join(HELDOUT_MEASURES)}, "
                            f"got {params.heldout_measure!r}")
        if not 0 <= params.nice <= 19:
            problems.append(f"params.nice must be in [0, 19], got {params.nice}")
        group = plan.actors[name].spec.group
        shared = sorted(a for a, actor in plan.actors.items() if a != name and actor.spec.group == group)
        if params.nice and shared:
            problems.append(f"params.nice {params.nice} would lower the priority of {', '.join(shared)} too "
                            f"(group {group!r}); give the distiller its own group")
        return problems

    async def on_start(self) -> None:
        if self.params.nice and not getattr(DraftDistiller, "_niced", False):  # once per process (restarts)
            os.nice(self.params.nice)
            DraftDistiller._niced = True
        torch.manual_seed(self.params.seed)
        self.device = use_device(self.params.device)
        self.policy = load_model(Path(self.params.model_path), device=self.device)
        self.tokenizer = load_tokenizer(self.params.model_path)
        self.head = (EagleHead.load(self.params.draft_path, self.policy) if self.params.draft_path
                     else EagleHead.for_target(self.policy)).eval()
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.params.lr)
        self.buffer = DistillBuffer(self.params.buffer_size, self.params.heldout_prompts)
        self.rng = random.Random(self.params.seed)
        self.policy_version = self.updated_at = 0
        self.version = 0  # of the head
        self.due: PolicyWeights | None = None  # the newest version an update may start from
        self.stopping = False
        self.wake = asyncio.Event()
        self.weight_files = WeightFiles(self.params.weights_dir, "respec-draft-", keep=2)  # the previous: read by now

    async def on_stop(self) -> None:
        self.stopping = True  # an update in its thread ends at its next step: the process can exit
        if hasattr(self, "weight_files"):  # absent if the start failed
            self.weight_files.close()

    @handles(DistillSample)
    async def on_sample(self, sample: DistillSample, envelope: Envelope) -> None:
        tokens = np.asarray(sample.tokens).tolist()
        if len(tokens) <= sample.response_start:
            return  # a refused prompt: nothing was generated
        self.buffer.add(Sequence(tokens, sample.response_start, sample.reward,
                                 sample.prompt_id.split("/")[0], sample.policy_version))

    @handles(PolicyWeights, optional=True)
    async def on_policy(self, weights: PolicyWeights, envelope: Envelope) -> None:
        """Noted here, loaded by `run` when an update is due from it: the copy serves updates
        alone, and loading every version (every ~0.15 s on a GPU, across GPUs from beside the
        trainer) cost both GPUs time and fell behind the publisher."""
        self.policy_version = weights.version
        if self._due(weights.version):
            self.due = weights
            self.wake.set()

    def _due(self, version: int) -> bool:
        return (version - self.updated_at >= self.params.update_interval
                and len(self.buffer.samples) >= self.params.min_buffer)

    async def run(self) -> None:
        """Updates run in a worker thread, so this actor's handlers keep taking samples and
        announcements meanwhile. Were they to wait for a multi-second update, the scorer's
        sends to this inbox could fill it and block the RL loop (the likely cause of a 4.4 s
        stall on two H100s at 8c4be4e). A restart (after a crash) starts again from
        `draft_path` and numbers its heads from 1 again."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            weights, self.due = self.due, None
            if weights is None or not self._due(weights.version):
                continue
            if await asyncio.to_thread(self._load, weights):
                await self._update(weights.version)

    def _load(self, weights: PolicyWeights) -> bool:
        use_device(self.params.device)  # this thread's current GPU too (cuda_ipc's synchronize)
        try:
            with loaded_tensors(weights.handle, weights.version, device=str(self.device)) as tensors:
                copy_in(self.policy, tensors)
        except (FileNotFoundError, SupersededWeights, TornWeights) as error:
            # The trainer keeps its latest few weight files (or cuda_ipc buffer sets) and has
            # moved on; a newer announcement is queued, and its load overwrites whatever a torn
            # copy left (nothing reads the copy before then).
            self.log.info("policy_weights_superseded", version=weights.version,
                          reason=f"{type(error).__name__}: {error}")
            return False
        return True

    async def _update(self, policy_version: int) -> None:
        started = time.perf_counter()
        pool, heldout = list(self.buffer.samples), self._heldout()  # copies: the handlers add to the buffer
        before, after, losses, heldout_s = await asyncio.to_thread(self._distil, pool, heldout)
        self.version += 1
        self.updated_at = policy_version
        seconds = time.perf_counter() - started
        await self.send(DraftWeights(version=self.version, handle=self._handle(), heldout_accept_before=before,
                                     heldout_accept_after=after, distill_s=seconds), draft_version=self.version)
        self.report(policy_version, draft_version=self.version, distill_kl=float(np.mean(losses)),
                    heldout_accept_before=before, heldout_accept_after=after, distill_s=seconds,
                    distill_heldout_s=heldout_s, distill_buffer=len(pool), distill_nice=os.nice(0))

    def _distil(self, pool: list[Sequence], heldout: list[list[int]] | list[Sequence]
                ) -> tuple[float, float, list[float], float]:
        """Held-out acceptance, `steps_per_update` reward-weighted steps, acceptance again;
        and the seconds the two measurements took (the rest of `distill_s` is the steps)."""
        use_device(self.params.device)
        started = time.perf_counter()
        before = self._acceptance(heldout)
        heldout_s = time.perf_counter() - started
        losses = []
        for _ in range(self.params.steps_per_update):
            if self.stopping:  # the run is ending: nothing will read this update
                return before, before, losses, heldout_s
            batch = self.rng.sample(pool, min(self.params.batch_size, len(pool)))
            weights = sample_weights(batch, pool, self.params.reward_weighting)
            losses.append(distill_step(self.head, self.policy, self.optimizer, batch, weights,
                                       self.tokenizer.pad_id or 0, self.params.unroll))
        started = time.perf_counter()
        after = self._acceptance(heldout)
        return before, after, losses, heldout_s + time.perf_counter() - started

    def _acceptance(self, heldout: list[list[int]] | list[Sequence]) -> float:
        shape = DraftShape.parse(self.params.eval_shape)
        if self.params.heldout_measure == "expected":
            return expected_acceptance(self.policy, self.head, heldout, shape.steps, self.params.heldout_temperature)
        return heldout_acceptance(self.policy, self.head, heldout, shape, self.params.eval_max_new_tokens,
                                  (self.tokenizer.eos_id,))

    def _heldout(self) -> list[list[int]] | list[Sequence]:
        """What `_acceptance` measures on: the held-out prompts, or their rollouts."""
        if self.params.heldout_measure == "expected":
            return list(self.buffer.heldout_rollouts)
        return list(self.buffer.heldout)

    def _handle(self) -> WeightsHandle:
        """The head's own tensors (not the policy's parts it shares), as a file: the
        Generator sits in another process in every graph where distillation overlaps."""
        path = self.weight_files.save(f"draft-v{self.version}",
                                      {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()})
        return WeightsHandle(kind="file", location=str(path))
