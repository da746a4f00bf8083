"""The per-step RL metrics the PolicyTrainer reports (one metrics.jsonl row per update).

Generation time of a step is the wall-clock span from the first of its rollouts being
admitted to the last one finishing (in an asynchronous run these spans of successive
steps overlap: that overlap is the point). Times come from the rollouts themselves:
`Rollout.gen_time_s` and when the RewardScorer received them (`ScoredRollout.received_at`).
"""

from __future__ import annotations

import numpy as np

from respec.messages import ScoredRollout


def group_index(group_id: str) -> int:
    """PromptSource names groups "g<index>"; the index is the data position."""
    return int(group_id.removeprefix("g"))


def step_metrics(scored: list[ScoredRollout], version: int) -> dict[str, float]:
    """Metrics of one update to `version` from these scored rollouts."""
    rollouts = [s.rollout for s in scored]
    lengths = np.array([len(r.tokens) for r in rollouts], dtype=np.float64)
    versions = np.concatenate([np.asarray(r.token_versions, np.int64) for r in rollouts])
    finished = np.array([s.received_at for s in scored])
    admitted = finished - np.array([r.gen_time_s for r in rollouts])
    gen_s = float(finished.max() - admitted.min()) if len(scored) else 0.0
    return {
        "reward_mean": float(np.mean([s.reward for s in scored])),
        "accuracy": float(np.mean([s.correct for s in scored])),
        "response_len": float(lengths.mean()),
        "accept_len": _accept_len(rollouts, lengths),
        "gen_s": gen_s,
        "gen_tokens_per_s": float(lengths.sum() / gen_s) if gen_s > 0 else 0.0,
        "score_s": float(sum(s.score_s for s in scored)),
        "staleness_mean": float((version - 1 - versions).mean()) if versions.size else 0.0,
        "staleness_max": int((version - 1 - versions).max()) if versions.size else 0,
        "checker_errors": sum(bool(s.error) for s in scored),
        "generation_errors": sum(s.rollout.finish_reason == "error" for s in scored),
    }


def form_shares(forms: list[str], known: tuple[str, ...]) -> dict[str, float]:
    """`form_<name>`: the share of the step's responses in each layout the task knows
    (Task.forms; format_shift: how far RL has moved the policy to the rewarded format)."""
    return {f"form_{name}": forms.count(name) / len(forms) for name in known} if forms else {}


def _accept_len(rollouts, lengths: np.ndarray) -> float:
    """Tokens per verification step over the whole batch (each rollout's first token comes
    from prefill, not from a step)."""
    emitted = np.maximum(lengths - 1, 0)
    steps = np.array([e / r.accept_len if r.accept_len > 0 else 0.0 for e, r in zip(emitted, rollouts, strict=True)])
    return float(emitted.sum() / steps.sum()) if steps.sum() > 0 else 1.0
