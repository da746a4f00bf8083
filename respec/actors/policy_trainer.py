"""PolicyTrainer: GRPO updates from scored rollouts; publishes every new policy version.

It collects whole groups (all G samples of a prompt), trains on `groups_per_step` of them
(in group order, so a synchronous run is reproducible), and publishes
`PolicyWeights(version)`: by reference when every Verifier shares its process, else as a
safetensors file. Per step it reports the RL metrics (metrics.jsonl); at the start and
the end it measures accuracy on the task's fixed held-out set (summary.json); every
`checkpoint_every` steps it writes a checkpoint that `respec run --resume` continues from.
Where the graph has a CapturedDistiller, each update also keeps its forward pass's hidden
states at the head's layers and its logits, and sends them (`CapturedTargets`, by
reference: the distiller shares this process) for the head to learn from.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import msgspec
import numpy as np
import torch

from respec.engine.checkpoint import load_model, weights_to_save
from respec.engine.devices import use_device
from respec.engine.drafters.eagle import TargetParts, layers_to_capture
from respec.engine.tokenizer import load_tokenizer
from respec.messages import (
    CapturedTargets,
    DraftWeights,
    Envelope,
    PolicyWeights,
    ScoredRollout,
    WeightsHandle,
)
from respec.rl import checkpoints
from respec.rl.evaluate import evaluate
from respec.rl.loss import PPOConfig
from respec.rl.step_metrics import form_shares, group_index, step_metrics
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample
from respec.runtime import Actor, handles, weights_route, weights_transfer
from respec.runtime.weight_files import WeightFiles
from respec.tasks import make_task


class PolicyTrainer(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        model_path: str
        group_size: int = 8  # G samples per prompt
        groups_per_step: int = 4
        buffer_groups: int = 64  # groups held until trained; PromptSource's staleness bound must fit
        lr: float = 1e-5
        gain_lr: float = 0.0  # lr of the RMSNorm gains (0: lr); with it, lr 0 trains the gains only
        micro_batch: int = 8
        length_multiple: int = 1  # pad micro-batches to a multiple of this many tokens (32 on a GPU: TrainerConfig)
        max_grad_norm: float = 1.0
        clip_eps: float = 0.2
        kl_coef: float = 0.0
        max_steps: int = 0  # end the run after this many updates (0: never)
        weights_dir: str = ""  # where file handles go (default: a temp dir, removed at the end)
        keep_weight_files: int = 4  # file handles kept: Generators and Verifiers are at most max_staleness
        # versions behind; a DraftDistiller further behind skips versions whose file is gone
        share_by_reference: bool = True  # in-process Verifiers get the tensors themselves
        device: str = "cpu"  # where the policy trains ("cuda": float32 master weights on the GPU)
        seed: int = 0
        # held-out evaluation (0 problems: none)
        task: str = "arithmetic"
        task_params: dict = {}
        eval_problems: int = 0
        eval_samples: int = 4  # draws per problem at eval_temperature
        eval_temperature: float = 1.0
        eval_max_new_tokens: int = 48
        eval_seed: int = 12345  # the held-out set (task.heldout); PromptSource skips it
        checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
        keep_checkpoints: int = 2
        profile_update: int = 0  # profile this update (1: the first; 0: none) into update_profile.txt

    sends = (PolicyWeights,)
    optional_sends = (CapturedTargets,)  # to a CapturedDistiller, where the graph has one
    reads_weights = False  # DraftWeights tell it the head's version and distillation time
    process_restartable = False  # the policy and optimizer live here; --resume continues a run

    async def on_start(self) -> None:
        torch.manual_seed(self.params.seed)
        use_device(self.params.device)  # the publisher's synchronize and streams follow the current device
        model = load_model(Path(self.params.model_path), device=self.params.device)
        captured = layers_to_capture(model.config) if self.context.plan.handlers_of(CapturedTargets) else ()
        config = TrainerConfig(lr=self.params.lr, gain_lr=self.params.gain_lr, micro_batch=self.params.micro_batch,
                               max_grad_norm=self.params.max_grad_norm, length_multiple=self.params.length_multiple,
                               ppo=PPOConfig(clip_eps=self.params.clip_eps, kl_coef=self.params.kl_coef),
                               capture_layers=captured)
        reference = load_model(Path(self.params.model_path), device=self.params.device) if self.params.kl_coef > 0 else None
        self.trainer = GRPOTrainer(model, config, reference)
        self.groups: dict[str, dict[int, ScoredRollout]] = defaultdict(dict)  # group -> sample index -> rollout
        self.ready: list[list[ScoredRollout]] = []
        self.trained_groups: list[int] = []
        self.draft_version, self.distill_s = 0, 0.0
        self.done = False  # max_steps reached: what still arrives is not trained on
        self.weight_files = WeightFiles(self.params.weights_dir, "respec-weights-", self.params.keep_weight_files)
        self.task = make_task(self.params.task, **self.params.task_params)
        self.tokenizer = load_tokenizer(self.params.model_path)
        self.eval_start = self._restore() if self.resuming else {}
        if not self.eval_start:
            self.eval_start = self._evaluate(0)

    async def on_stop(self) -> None:
        if hasattr(self, "weight_files"):  # absent if the start failed
            self.weight_files.close()

    def _restore(self) -> dict[str, float]:
        """Continue from the latest checkpoint (if any); returns the step-0 evaluation."""
        latest = checkpoints.latest_checkpoint(self.run_dir)
        if latest is None:
            return {}
        meta = checkpoints.load_meta(latest)
        self.trainer.model.load_state_dict(checkpoints.load_policy(latest), strict=False)
        state = checkpoints.load_trainer_state(latest)
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.trainer.version = meta.policy_version
        self.trained_groups = list(meta.trained_groups)
        self.draft_version = meta.draft_version
        self.log.info("resumed", checkpoint=latest.name, step=meta.step, version=meta.policy_version)
        self._publish_soon = True
        return meta.eval_start

    async def run(self) -> None:
        if getattr(self, "_publish_soon", False):  # a resumed run: Verifiers load the checkpoint's weights
            version = self.trainer.version
            await self.send(PolicyWeights(version=version, handle=self._handle(version)), policy_version=version)

    @handles(DraftWeights, optional=True)
    async def on_draft_weights(self, weights: DraftWeights, envelope: Envelope) -> None:
        self.draft_version = weights.version
        self.distill_s += weights.distill_s  # reported with the next update, then reset

    @handles(ScoredRollout)
    async def on_scored(self, scored: ScoredRollout, envelope: Envelope) -> None:
        prompt = scored.rollout.prompt
        if self.done or self._already_have(prompt.group_id):
            return  # a group posed again after a restart, already trained on (or complete)
        group = self.groups[prompt.group_id]
        group[prompt.sample_index] = scored  # a re-posed sample replaces, never duplicates
        if len(group) == self.params.group_size:
            self.ready.append([group[i] for i in sorted(group)])
            del self.groups[prompt.group_id]
        if len(self.ready) >= self.params.groups_per_step:
            self.ready.sort(key=lambda g: group_index(g[0].rollout.prompt.group_id))
            batch, self.ready = self.ready[: self.params.groups_per_step], self.ready[self.params.groups_per_step:]
            await self._update(batch, envelope.sent_at)

    def _form_shares(self, scored: list[ScoredRollout]) -> dict[str, float]:
        if not self.task.forms:
            return {}  # decoding every response costs time: only for tasks that tell forms apart
        forms = [self.task.form_of(self.tokenizer.decode(s.rollout.tokens.tolist())) for s in scored]
        return form_shares(forms, self.task.forms)

    def _already_have(self, group_id: str) -> bool:
        return (group_index(group_id) in self.trained_groups
                or any(group[0].rollout.prompt.group_id == group_id for group in self.ready))

    async def _update(self, groups: list[list[ScoredRollout]], received_at: float) -> None:
        scored = [s for group in groups for s in group]
        started = time.perf_counter()
        # A prompt the Generator refused has no tokens: it says nothing about the policy, and
        # its reward 0 would skew its group's advantages, so it is left out of the update.
        samples = [_sample(s) for s in scored if s.rollout.finish_reason != "error"]
        if self.trainer.version + 1 == self.params.profile_update:
            stats = self._profiled_step(samples)
        else:
            stats = self.trainer.step(samples)
        update_s = time.perf_counter() - started  # the step ends in a host sync (its loss as a float)
        version = self.trainer.version
        trained = [group_index(g[0].rollout.prompt.group_id) for g in groups]
        self.trained_groups += trained
        await self.send(PolicyWeights(version=version, handle=self._handle(version), trained_groups=trained),
                        policy_version=version)
        await self._send_captured(samples, version - 1)
        train_s = time.perf_counter() - started
        self.report(version, policy_version=version, draft_version=self.draft_version,
                    **step_metrics(scored, version), **self._form_shares(scored), train_s=train_s, update_s=update_s,
                    publish_s=train_s - update_s, distill_s=self.distill_s,
                    loss=stats["loss"], grad_norm=stats["grad_norm"], groups=trained,
                    **{key: stats[key] for key in PPO_STATS if key in stats})
        self.distill_s = 0.0
        if self.params.checkpoint_every and version % self.params.checkpoint_every == 0:
            self._checkpoint()
        if self.params.max_steps and version >= self.params.max_steps:
            await self._finish()

    async def _send_captured(self, samples: list[TrainSample], version: int) -> None:
        """The update's pass over `samples` (made by `version`), one message per micro-batch;
        the first carries copies of the new weights' parts a head reads."""
        layers = list(self.trainer.config.capture_layers)
        for index, view in enumerate(self.trainer.captured):
            rows = view.rows.tolist()
            parts = TargetParts.state_of(self.trainer.model) if index == 0 else {}
            await self.send(CapturedTargets(
                policy_version=version, layers=layers, tokens=view.tokens, valid=view.valid,
                response_starts=torch.tensor([len(samples[r].prompt) for r in rows], device=view.tokens.device),
                features=view.features, logits=view.logits,
                rewards=np.array([samples[r].reward for r in rows], dtype=np.float32),
                groups=[samples[r].group_id for r in rows], parts=parts), policy_version=version)
        self.trainer.captured = []  # the messages hold them now

    def _profiled_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One update under torch.profiler: its operators by host and device time, written to
        the run's update_profile.txt (where an update's time goes inside the actor graph)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._device().type == "cuda" else [])
        with profile(activities=activities) as profiler:
            stats = self.trainer.step(samples)
        sort = "device_time_total" if self._device().type == "cuda" else "cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=40)
        (Path(self.run_dir) / "update_profile.txt").write_text(table)
        return stats

    async def _finish(self) -> None:
        self.done = True
        self._checkpoint()
        end = self._evaluate(self.trainer.version)
        summary = {f"{key}_start": value for key, value in self.eval_start.items()}
        summary.update({f"{key}_end": value for key, value in end.items()})
        self.summarize(**summary, policy_version=self.trainer.version)
        self.finish_run(f"{self.trainer.version} policy updates")

    def _evaluate(self, step: int) -> dict[str, float]:
        if not self.params.eval_problems:
            return {}
        started = time.perf_counter()
        problems = self.task.heldout(self.params.eval_problems, self.params.eval_seed)
        result = evaluate(self.trainer.model, self.tokenizer, self.task, problems, self.params.eval_temperature,
                          self.params.eval_samples, self.params.eval_max_new_tokens, seed=self.params.seed)
        self.report(step, heldout_accuracy=result["accuracy"], heldout_greedy_accuracy=result["greedy_accuracy"],
                    eval_s=time.perf_counter() - started)
        return result

    def _checkpoint(self) -> None:
        meta = checkpoints.CheckpointMeta(step=self.trainer.version, policy_version=self.trainer.version,
                                          draft_version=self.draft_version,
                                          trained_groups=sorted(self.trained_groups), eval_start=self.eval_start)
        state = {"optimizer": self.trainer.optimizer.state_dict(), "rng": torch.get_rng_state()}
        path = checkpoints.save_checkpoint(self.run_dir, meta, weights_to_save(self.trainer.model), state,
                                           self.params.keep_checkpoints)
        self.log.info("checkpoint_saved", path=str(path), step=meta.step)
        self.context.trace.flush()  # what the checkpoint covers is in the trace, even if we die now

    def _handle(self, version: int) -> WeightsHandle:
        state = {name: tensor.detach() for name, tensor in self.trainer.model.state_dict().items()}
        kind = self._weights_kind()
        if kind == "local":
            return WeightsHandle(kind="local", tensors={k: v.clone() for k, v in state.items()})
        if kind in ("cuda_ipc", "collective"):
            return weights_transfer.as_message(self._publisher(kind).publish(state, version))
        path = self.weight_files.save(f"policy-v{version}", weights_to_save(self.trainer.model))
        return WeightsHandle(kind="file", location=str(path))

    def _weights_kind(self) -> str:
        """`run.weights` resolved for this trainer and the PolicyWeights receivers (auto:
        local in one process, cuda_ipc on one host with CUDA on both sides, else file)."""
        plan = self.context.plan
        same_process = weights_route.all_in_group(plan, PolicyWeights, self.context.group.name)
        setting = plan.config.run.weights
        if setting == "auto" and not self.params.share_by_reference and same_process:
            return "file"
        if setting == "local" and not same_process:
            raise ValueError("run.weights: local needs every PolicyWeights receiver in the trainer's process group")
        return weights_route.kind(plan, PolicyWeights, self.context.group.name, self._device())

    def _device(self) -> torch.device:
        return next(self.trainer.model.parameters()).device

    def _publisher(self, kind: str):
        """One publisher for the run: its IPC buffers or process group serve every version."""
        publisher = getattr(self, "weights_publisher", None)
        if publisher is None:
            plan = self.context.plan
            run = plan.config.run
            if kind == "cuda_ipc":
                gpu = weights_route.receivers_gpu(plan, PolicyWeights, self._device())
                publisher = weights_transfer.CudaIpcPublisher(keep=run.weights_keep, device=gpu)
            else:
                # the processes that join each broadcast: those whose actors load the weights
                groups = {plan.actors[name].spec.group for name in weights_route.loaders(plan, PolicyWeights)}
                groups.discard(self.context.group.name)
                publisher = weights_transfer.CollectivePublisher(
                    receivers=len(groups), device=self._device(),
                    host=run.host if run.transport == "tcp" else "127.0.0.1")
            self.weights_publisher = publisher
        return publisher


# The update's trust-region statistics (respec.rl.loss): behaviour_weight_mean far from 1
# says the generator's log-probabilities disagree with the trainer's (stale or wrong).
PPO_STATS = ("behaviour_weight_mean", "clip_fraction", "ratio_mean")


def _sample(scored: ScoredRollout) -> TrainSample:
    rollout = scored.rollout
    return TrainSample(
        prompt=torch.from_numpy(np.asarray(rollout.prompt.tokens, np.int64)),
        response=torch.from_numpy(np.asarray(rollout.tokens, np.int64)),
        behaviour_logprobs=torch.from_numpy(np.asarray(rollout.logprobs, np.float32)),
        reward=scored.reward, group_id=rollout.prompt.group_id, temperature=rollout.prompt.sampling.temperature,
    )
