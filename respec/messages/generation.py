"""Messages of the rollout path: prompts in, verification, rollouts and scheduling out."""

from __future__ import annotations

import msgspec
import numpy as np

from respec.messages.arrays import Array
from respec.messages.base import Channel, Message


class SamplingParams(msgspec.Struct, frozen=True):
    """How one row samples. The Verifier validates these before a row is admitted."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1.0 means off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()


class Prompt(Message, frozen=True):
    """One sample to generate (a GRPO group of G samples is G prompts sharing group_id)."""

    prompt_id: str  # unique per sample, "<group_id>/<sample_index>"
    group_id: str  # the question; samples of one group are normalised together
    sample_index: int  # 0..G-1 within the group
    tokens: Array  # int32 [P] prompt token ids
    sampling: SamplingParams = SamplingParams()
    task: str = ""  # name of the task whose checker scores it
    answer: str = ""  # reference answer for the RewardScorer; never shown to the policy
    text: str = ""  # the prompt as text, for logs and traces
    # The oldest policy version that may generate this sample (the staleness bound, set by
    # the PromptSource). Prompts and PolicyWeights travel on different sockets, so a prompt
    # can arrive before the weights it needs; the Verifier holds it (VerifyResult.held)
    # until it has loaded at least this version. 0: any version.
    min_policy_version: int = 0


class VerifyRequest(Message, frozen=True):
    """Generator -> Verifier: one step for a batch of rows (zero draft nodes = plain decode).

    Row b feeds `tokens[b, :1 + num_nodes[b]]`: the last committed token (the root) followed
    by the draft nodes; node i's parent is `parents[b, i]` (-1 is the root), so a chain is
    parents = [-1, 0, 1, ...].
    """

    channel = Channel.REQUEST
    step: int  # the Generator's step counter
    slots: Array  # int32 [B] Verifier cache slots of the rows
    tokens: Array  # int32 [B, 1 + n] root token then draft nodes, padded
    parents: Array  # int32 [B, n] parent node index of each draft node, -1 = root
    num_nodes: Array  # int32 [B] valid draft nodes per row
    draft_probs: Array | None = None  # float32 [B, n, V] drafter's q at each node, if sampled
    new_rows: list[Prompt] = []  # rows to prefill into free slots before this step
    finished_slots: Array | None = None  # int32 slots whose rows ended and are freed
    capture_layers: tuple[int, ...] = ()  # target layers whose hidden states to return (the drafter's)
    feature_window: int = 0  # features returned per new row: its last W prompt tokens (0: all)


class RejectedRow(msgspec.Struct, frozen=True):
    """One new row the Verifier refused (bad input); the rest of the request goes on."""

    index: int  # position in VerifyRequest.new_rows
    prompt_id: str
    error: str  # "<ErrorType>: what is wrong, with the value at fault"


class VerifyResult(Message, frozen=True):
    """Verifier -> Generator: what each row accepted, with what the drafter and RL need.

    Rows are the accepted new rows (request order, rejected and held ones left out) then the
    verified rows (request order). A new row has no drafts: its one token is the first
    sampled one.
    """

    step: int
    slots: Array  # int32 [B] same order as the request
    num_accepted: Array  # int32 [B] accepted draft tokens per row (bonus not counted)
    tokens: Array  # int32 [B, n + 1] accepted tokens then the bonus token, padded with -1
    logprobs: Array  # float32 [B, n + 1] behaviour log-probabilities of those tokens
    # [B, X, F] target features (capture_layers concatenated; model dtype), valid for the
    # first feature_counts[b] entries, zeros after: a new row's last min(W, P) prompt tokens,
    # a verified row's root and accepted nodes (one per emitted token). X = max(W, n + 1).
    features: Array | None = None
    feature_counts: Array | None = None  # int32 [B] valid feature entries per row
    target_probs_topk: Array | None = None  # float32 [B, n + 1, K] distillation targets
    target_ids_topk: Array | None = None  # int32 [B, n + 1, K] their token ids
    step_time_s: float = 0.0  # verifier forward + acceptance wall time
    policy_version: int = -1  # the policy weights that produced these tokens
    rejected: list[RejectedRow] = []  # new rows refused for bad input; not among the B rows
    # Indices in VerifyRequest.new_rows not admitted yet because their Prompt.min_policy_version
    # is newer than policy_version: not among the B rows; the Generator sends them again.
    held: list[int] = []


class Rollout(Message, frozen=True):
    """Generator -> RewardScorer: one finished sample with everything RL needs."""

    prompt: Prompt
    tokens: Array  # int32 [T] response tokens
    logprobs: Array  # float32 [T] behaviour log-probability of each token
    token_versions: Array  # int32 [T] policy version that produced each token
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "error" (rejected)
    accept_len: float = 0.0  # tokens per verification step (the first token comes from prefill)
    gen_time_s: float = 0.0  # from admission to finish
    error: str = ""  # finish_reason "error": why the prompt was refused (no tokens then)

    @classmethod
    def refused(cls, prompt: Prompt, error: str) -> Rollout:
        """The Rollout of a prompt a backend refused: no tokens, the reason in `error`, so
        every prompt sent still gets exactly one Rollout (group bookkeeping stays whole)."""
        empty = np.zeros(0, dtype=np.int32)
        return cls(prompt=prompt, tokens=empty, logprobs=empty.astype(np.float32), token_versions=empty,
                   finish_reason="error", error=error)


class GenerationStats(Message, frozen=True):
    """Generator -> Scheduler (and any other listener): live load and speed after a step."""

    channel = Channel.BROADCAST

    active_rows: int
    waiting_prompts: int
    config: str  # "nosd" or "s{s}_t{t}_n{n}"
    step_time_s: float
    tokens_emitted: int  # tokens appended across rows this step
    mean_accept_len: float
    context_len_mean: float


class SchedulerDecision(Message, frozen=True):
    """Scheduler -> Generator: how to decode from the next step on, and why."""

    channel = Channel.BROADCAST
    decision_id: int
    speculate: bool  # False: plain decoding
    steps: int = 0  # s: draft depth
    branch: int = 1  # t: children per expanded node (1 = chain)
    num_draft: int = 0  # n: draft tokens verified per row
    batch_size: int = 0  # active rows the decision was made for
    predicted_tokens_per_s: dict[str, float] = {}  # every candidate's predicted speed
    reason: str = ""
    pause_generation: bool = False  # the staleness bound is reached: admit no new rows
VerifyRequest.reply = VerifyResult
