"""One GRPO update of the policy from scored rollouts (no runtime: the PolicyTrainer actor
wraps this).

Per update: group-normalised advantages; the proximal log-probabilities (the weights
before this update) recomputed without gradients; then `epochs` passes of the decoupled
PPO-clip objective over micro-batches, gradients accumulated so the result does not
depend on the micro-batch size; global gradient-norm clipping; AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respec.engine.devices import bf16_autocast
from respec.engine.model import CausalLM
from respec.rl.advantages import group_advantages
from respec.rl.loss import PPOConfig, ppo_loss


@dataclass(frozen=True)
class TrainSample:
    prompt: torch.Tensor  # long [P]
    response: torch.Tensor  # long [R]
    behaviour_logprobs: torch.Tensor  # float [R], recorded at generation time
    reward: float
    group_id: str
    temperature: float = 1.0  # the sampling temperature (0: greedy, scored at T = 1)


@dataclass(frozen=True)
class TrainerConfig:
    lr: float = 1e-5
    gain_lr: float = 0.0  # lr of the RMSNorm gains (0: `lr`; with it, lr 0 freezes the rest): _param_groups
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch: int = 8
    # Pad each micro-batch's length up to a multiple of this: on a GPU every new length is a
    # new set of kernel shapes. Unpadded, one GPU update's time was bimodal from step to step;
    # padded to 32, the baseline's median agreed within 20% across a run (one run:
    # docs/PERFORMANCE.md). Padding changes no real position.
    length_multiple: int = 1
    epochs: int = 1
    scale_by_std: bool = True
    # AdamW as one fused kernel over every parameter where they are all on a GPU (the
    # for-each default launches a handful of kernels per parameter tensor, ~290 of them at
    # the 0.5B shape): bench/train_lane.py measures both. The CPU keeps the default.
    fused_adamw: bool = True
    # Layers whose hidden states the update's forward pass keeps, with its logits, for a
    # drafter's distillation (GRPOTrainer.captured): the distillation then needs no target
    # pass of its own (58% of a head update's time on an H100, bench/train_lane.py). The
    # targets are the weights before this update, one version older than a pass after it.
    capture_layers: tuple[int, ...] = ()
    # On a GPU the passes run under bf16 autocast (float32 master weights and optimizer), as
    # bench/gpu_rl.py's measured RL step does. The first GPU run of the actor graph trained
    # in plain float32: 1.2-2 s per update of 64 rollouts at the 0.5B shape, 6-10x its
    # generation, so the trainer set the pace (docs/PERFORMANCE.md, "The fast path on an H100 after
    # 198c9fe", 6). A CPU ignores it.
    bf16_on_gpu: bool = True
    ppo: PPOConfig = PPOConfig()


class GRPOTrainer:
    def __init__(self, model: CausalLM, config: TrainerConfig = TrainerConfig(),
                 reference: CausalLM | None = None) -> None:
        self.model, self.config, self.reference = model, config, reference
        groups = _param_groups(model, config)
        self._trained = [p for group in groups for p in group["params"]]
        on_gpu = all(p.is_cuda and p.dtype == torch.float32 for p in self._trained)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=True if config.fused_adamw and on_gpu else None)
        self.version = 0
        self.captured: list[CapturedPass] = []  # the last step's, when config.capture_layers

    def step(self, samples: list[TrainSample]) -> dict[str, float]:
        device = next(self.model.parameters()).device
        with bf16_autocast(device, on=self.config.bf16_on_gpu):
            return self._step(samples)

    def _step(self, samples: list[TrainSample]) -> dict[str, float]:
        if not samples:  # nothing to learn from (every rollout failed): a new version, same weights
            self.version += 1
            return {"loss": 0.0, "grad_norm": 0.0, "reward_mean": 0.0, "advantage_abs_mean": 0.0, "skipped": 0.0}
        device = next(self.model.parameters()).device
        rewards = torch.tensor([s.reward for s in samples])
        advantages = group_advantages(rewards, [s.group_id for s in samples], self.config.scale_by_std).to(device)
        multiple = self.config.length_multiple
        batch = _pad(samples, multiple).to(device)
        micro_batches = [batch.select(rows, multiple) for rows in _by_length(samples, self.config.micro_batch, device)]
        with torch.no_grad():
            proximal = [self._logprobs(self.model, part) for part in micro_batches] if self._proximal_pass() else None
            reference = ([self._logprobs(self.reference, part) for part in micro_batches]
                         if self.reference is not None else None)
        total_tokens = batch.mask.sum().clamp(min=1)
        stats: dict[str, float] = {}  # token-weighted means over the micro-batches (of the last epoch)
        self.captured = []
        self.model.train()
        for epoch in range(self.config.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            stats = {}
            for i, part in enumerate(micro_batches):
                keep = self.captured if epoch == 0 and self.config.capture_layers else None
                logprobs = self._logprobs(self.model, part, self.config.capture_layers, keep)
                loss, part_stats = ppo_loss(logprobs, logprobs.detach() if proximal is None else proximal[i],
                                            part.behaviour, advantages[part.rows], part.mask, self.config.ppo,
                                            None if reference is None else reference[i])
                share = part.mask.sum() / total_tokens
                (loss * share).backward()  # token-mean over the whole batch
                for key, value in part_stats.items():
                    stats[key] = stats.get(key, 0.0) + value * float(share)
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trained, self.config.max_grad_norm)
            skipped = not torch.isfinite(grad_norm)
            if skipped:  # one NaN step would poison AdamW's moments, and every later step with them
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
        self.model.eval()
        self.version += 1
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "reward_mean": float(rewards.mean()),
                "advantage_abs_mean": float(advantages.abs().mean()), "skipped": float(skipped), **stats}

    def _proximal_pass(self) -> bool:
        """Whether the proximal log-probs need a pass of their own. With one epoch there is one
        optimiser step, after every micro-batch: the weights being trained are the proximal
        ones throughout, so their log-probs (detached) are the proximal log-probs, and the
        update saves a forward pass."""
        return self.config.epochs > 1

    @staticmethod
    def _logprobs(model: CausalLM, batch: _Batch, capture_layers: tuple[int, ...] = (),
                  keep: list[CapturedPass] | None = None) -> torch.Tensor:
        """log p(response token | everything before it), at T = the sampling temperature;
        with `keep`, the pass's captured hidden states and logits are appended to it."""
        output = model(batch.tokens, capture_layers=capture_layers or None)
        if keep is not None:
            valid = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None, :] < batch.lengths[:, None]
            keep.append(CapturedPass(batch.rows, batch.tokens, valid, torch.cat(output.captured, dim=-1).detach(),
                                     output.logits.detach()))
        logits = output.logits[:, :-1].float()
        logits = logits / batch.temperature[:, None, None]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
        return logp.gather(1, batch.response_index)


def _param_groups(model: CausalLM, config: TrainerConfig) -> list[dict]:
    """The RMSNorm gains (size ~1) apart from the matrices (size ~0.02) when `gain_lr` is set;
    a group whose lr is 0 is frozen (no gradients computed for it).

    Adam moves every parameter by about lr per step, whatever its gradient's noise. On the
    tiny policy, RL's reward signal is weak next to that noise: full-parameter updates at
    any lr that moved accuracy made it worse, and so did updates from shuffled rewards
    (docs/RL.md). The gains, a few thousand numbers every rollout informs, set how sharp
    the policy is; they take the update with little damage, at an lr 50x their size allows.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not config.gain_lr:
        return [{"params": [p for _, p in named]}]
    gains = [p for name, p in named if name.endswith("norm.weight")]
    others = [p for name, p in named if not name.endswith("norm.weight")]
    groups = [{"params": others, "lr": config.lr}, {"params": gains, "lr": config.gain_lr}]
    for group in groups:
        if group["lr"] == 0:
            for parameter in group["params"]:
                parameter.requires_grad_(False)
    return [group for group in groups if group["lr"] > 0]


@dataclass(frozen=True)
class CapturedPass:
    """What the update's forward pass computed for some of the step's rollouts, detached:
    a drafter distils from it (TrainerConfig.capture_layers)."""
    rows: torch.Tensor  # long [B]: which of the step's samples, in the order given to step()
    tokens: torch.Tensor  # long [B, L]: prompt + response, right-padded
    valid: torch.Tensor  # bool [B, L]: the real tokens
    features: torch.Tensor  # [B, L, layers * hidden]: the hidden states after capture_layers, concatenated
    logits: torch.Tensor  # [B, L, V]: the policy's raw logits (no temperature)


@dataclass
class _Batch:
    tokens: torch.Tensor  # long [B, L] prompt + response, right-padded
    response_index: torch.Tensor  # long [B, R]: where, in logp [B, L-1], each response token is predicted
    mask: torch.Tensor  # bool [B, R]
    behaviour: torch.Tensor  # float [B, R]
    temperature: torch.Tensor  # float [B]
    lengths: torch.Tensor  # long [B]: prompt + response tokens of each row
    rows: torch.Tensor | None = None  # long [B]: which rows of the whole batch these are (a micro-batch)

    def to(self, device: torch.device) -> _Batch:
        return _Batch(*(getattr(self, name).to(device) for name in
                        ("tokens", "response_index", "mask", "behaviour", "temperature", "lengths")))

    def select(self, rows: torch.Tensor, multiple: int = 1) -> _Batch:
        """These rows, cut to the longest of them (rounded up to `multiple`): right padding
        changes no real position's logits (attention is causal), so a micro-batch of short
        rows costs what they do."""
        length, width = _round_up(int(self.lengths[rows].max()), multiple), int(self.mask[rows].sum(1).max())
        return _Batch(self.tokens[rows, :length], self.response_index[rows, :width], self.mask[rows, :width],
                      self.behaviour[rows, :width], self.temperature[rows], self.lengths[rows], rows)


def _by_length(samples: list[TrainSample], micro_batch: int, device: torch.device) -> list[torch.Tensor]:
    """Micro-batches of rows of similar length (the rollouts of one RL step run from a few
    tokens to max_new: in arrival order, most of each micro-batch would be padding). The
    gradient is summed over all of them before the optimiser steps, so the grouping does
    not change the update."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt) + len(samples[i].response))
    return list(torch.tensor(order, device=device).split(micro_batch))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(samples: list[TrainSample], multiple: int = 1) -> _Batch:
    length = _round_up(max(len(s.prompt) + len(s.response) for s in samples), multiple)
    width = max(len(s.response) for s in samples)
    tokens = torch.zeros(len(samples), length, dtype=torch.long)
    index = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    behaviour = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        prompt, response = len(sample.prompt), len(sample.response)
        tokens[row, : prompt + response] = torch.cat([sample.prompt, sample.response])
        index[row, :response] = torch.arange(prompt - 1, prompt - 1 + response)  # logits at i predict i + 1
        mask[row, :response] = True
        behaviour[row, :response] = sample.behaviour_logprobs
    temperature = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in samples])
    lengths = torch.tensor([len(s.prompt) + len(s.response) for s in samples])
    return _Batch(tokens, index, mask, behaviour, temperature, lengths)
