"""PolicyTrainer: GRPO updates from scored rollouts; publishes every new policy version.

It waits for whole groups (all G samples of a prompt), trains on `groups_per_step` of
them, and publishes `PolicyWeights(version)`: by reference when every Verifier shares its
process, else as a safetensors file in the run directory. Each step's metrics go to the
runtime (metrics.jsonl), with the staleness of the tokens trained on.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

import msgspec
import numpy as np
import torch
from safetensors.torch import save_file

from respec.engine.checkpoint import load_model
from respec.messages import Envelope, PolicyWeights, ScoredRollout, WeightsHandle
from respec.rl.loss import PPOConfig
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample
from respec.runtime import Actor, handles


class PolicyTrainer(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str
        group_size: int = 8  # G samples per prompt
        groups_per_step: int = 4
        lr: float = 1e-5
        micro_batch: int = 8
        max_grad_norm: float = 1.0
        clip_eps: float = 0.2
        kl_coef: float = 0.0
        max_steps: int = 0  # end the run after this many updates (0: never)
        weights_dir: str = ""  # where file handles go (default: a temp dir)
        share_by_reference: bool = True  # in-process Verifiers get the tensors themselves

    sends = (PolicyWeights,)

    async def on_start(self) -> None:
        model = load_model(Path(self.params.model_path))
        config = TrainerConfig(lr=self.params.lr, micro_batch=self.params.micro_batch,
                               max_grad_norm=self.params.max_grad_norm,
                               ppo=PPOConfig(clip_eps=self.params.clip_eps, kl_coef=self.params.kl_coef))
        reference = load_model(Path(self.params.model_path)) if self.params.kl_coef > 0 else None
        self.trainer = GRPOTrainer(model, config, reference)
        self.groups: dict[str, list[ScoredRollout]] = defaultdict(list)
        self.ready: list[list[ScoredRollout]] = []
        self.weights_dir = Path(self.params.weights_dir or tempfile.mkdtemp(prefix="respec-weights-"))

    @handles(ScoredRollout)
    async def on_scored(self, scored: ScoredRollout, envelope: Envelope) -> None:
        group = self.groups[scored.rollout.prompt.group_id]
        group.append(scored)
        if len(group) == self.params.group_size:
            self.ready.append(self.groups.pop(scored.rollout.prompt.group_id))
        if len(self.ready) >= self.params.groups_per_step:
            batch, self.ready = self.ready[: self.params.groups_per_step], self.ready[self.params.groups_per_step :]
            await self._update([s for group in batch for s in group])

    async def _update(self, scored: list[ScoredRollout]) -> None:
        started = time.perf_counter()
        versions = np.concatenate([np.asarray(s.rollout.token_versions) for s in scored])
        stats = self.trainer.step([_sample(s) for s in scored])
        version = self.trainer.version
        await self.send(PolicyWeights(version=version, handle=self._handle(version)), policy_version=version)
        self.report(version, **stats, train_s=time.perf_counter() - started,
                    staleness_mean=float((version - 1 - versions).mean()) if versions.size else 0.0,
                    accuracy=float(np.mean([s.correct for s in scored])))
        if self.params.max_steps and version >= self.params.max_steps:
            self.finish_run(f"{version} policy updates")

    def _handle(self, version: int) -> WeightsHandle:
        state = {name: tensor.detach() for name, tensor in self.trainer.model.state_dict().items()}
        if self.params.share_by_reference and self._verifiers_share_my_process():
            return WeightsHandle(kind="local", tensors={k: v.clone() for k, v in state.items()})
        path = self.weights_dir / f"policy-v{version}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)
        return WeightsHandle(kind="file", location=str(path))

    def _verifiers_share_my_process(self) -> bool:
        plan = self.context.plan
        return all(plan.actors[name].spec.group == self.context.group.name
                   for name in plan.handlers_of(PolicyWeights))


def _sample(scored: ScoredRollout) -> TrainSample:
    rollout = scored.rollout
    return TrainSample(
        prompt=torch.from_numpy(np.asarray(rollout.prompt.tokens, np.int64)),
        response=torch.from_numpy(np.asarray(rollout.tokens, np.int64)),
        behaviour_logprobs=torch.from_numpy(np.asarray(rollout.logprobs, np.float32)),
        reward=scored.reward, group_id=rollout.prompt.group_id, temperature=rollout.prompt.sampling.temperature,
    )
