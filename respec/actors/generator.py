"""Generator: owns the rollout rows and the drafter; turns Prompts into Rollouts.

Its loop: admit waiting prompts into free rows, draft a tree per active row (or nothing
when the Scheduler says SD is off), ask the Verifier to verify (one request per step, new
rows and freed slots ride along), append what was accepted, and send each finished row
as a Rollout with every token's behaviour log-probability and policy version. Drafter
weights and scheduling decisions are swapped in between steps.

Drafters: "ngram" (prompt lookup), "none", or "eagle": an EAGLE-3-style head
(`respec.engine.drafters.eagle`) over the target's hidden states. For "eagle" every
VerifyRequest names the head's `capture_layers`, and the Verifier sends back those
layers' features (the last `feature_window` prompt positions of a new row, the kept
positions of a verified row), which the RowBook keeps per row for the next draft.

The head also reads the target's token embeddings, final norm and lm_head. They are
the policy's own tensors, so the Generator loads them from `model_path` (nothing else:
the decoder layers stay on the meta device and cost no memory) and refreshes them from
every PolicyWeights, so drafts follow the current policy. Cost: vocab x hidden twice
(once with tied embeddings) plus a norm, in float32: about 4.4 GB for a 7B Qwen2.5
(152k x 3584, untied), a few MB for the embedded default. Sending them with every step
would cost far more, and the Verifier may sit in another process, so they cannot be
shared by reference.

A prompt the Verifier refuses (empty, ids outside the vocabulary, too long for the
cache, invalid sampling parameters) comes back as a Rollout with finish_reason "error"
and the reason in `error`; the other rows of that step go on as if nothing happened.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import torch
from safetensors import safe_open

from respec.engine.checkpoint import INDEX_FILE, SINGLE_FILE
from respec.engine.config import ModelConfig
from respec.engine.drafters.base import Drafter, DraftShape
from respec.engine.drafters.eagle import EagleDrafter, EagleHead
from respec.engine.drafters.ngram import NgramDrafter
from respec.engine.errors import CheckpointError
from respec.engine.model import CausalLM
from respec.engine.speculative import Row, RowBook
from respec.engine.target import Verified
from respec.messages import (
    DraftWeights,
    Envelope,
    GenerationStats,
    PolicyWeights,
    Prompt,
    Rollout,
    SchedulerDecision,
    VerifyRequest,
    VerifyResult,
    WeightsHandle,
)
from respec.messages.generation import RejectedRow
from respec.runtime import Actor, handles

DRAFTERS = ("none", "ngram", "eagle")
# The target tensors an EAGLE head shares (checkpoint names); lm_head is absent when tied.
SHARED_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


class Generator(Actor):
    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        max_rows: int = 64  # must not exceed the Verifier's
        drafter: str = "ngram"  # "ngram", "eagle" or "none"
        shape: str = "s4_t1_n4"  # the draft shape until the Scheduler decides; "nosd": off
        stats_every: int = 0  # send GenerationStats every N steps (0: never)
        model_path: str = ""  # eagle: the target checkpoint (its embeddings, final norm, lm_head)
        draft_path: str = ""  # eagle: a head saved by EagleHead.save; "" = freshly initialised
        feature_window: int = 16  # eagle: target features kept per row (the head's context)
        device: str = "cpu"  # eagle: where the head runs
        seed: int = 0  # eagle: initialisation of a fresh head

    sends = (VerifyRequest, Rollout, GenerationStats)

    @classmethod
    def check_plan(cls, name, params, plan) -> list[str]:
        """Every row the Generator admits needs a cache slot in the Verifier."""
        problems = []
        for verifier in plan.handlers_of(VerifyRequest):
            rows = getattr(plan.actors[verifier].params, "max_rows", None)
            if rows is not None and params.max_rows > rows:
                problems.append(f"params.max_rows {params.max_rows} is more than actors.{verifier}.params.max_rows "
                                f"({rows}): rows beyond the Verifier's cache slots would be refused")
        return problems

    async def on_start(self) -> None:
        self.book = RowBook(self._drafter())
        drafter = self.book.drafter
        self.capture_layers = tuple(drafter.capture_layers) if self.book.wants_features else ()
        self.shape = None if self.params.shape == "nosd" else DraftShape.parse(self.params.shape)
        self.waiting: deque[Prompt] = deque()
        self.prompts: dict[int, Prompt] = {}  # row id -> its prompt message
        self.versions: dict[int, list[int]] = {}  # row id -> policy version of each token
        self.started: dict[int, float] = {}
        self.freed: list[int] = []
        self.step_count = 0
        self.wake = asyncio.Event()

    @handles(Prompt)
    async def on_prompt(self, prompt: Prompt, envelope: Envelope) -> None:
        self.waiting.append(prompt)
        self.wake.set()

    @handles(SchedulerDecision, optional=True)
    async def on_decision(self, decision: SchedulerDecision, envelope: Envelope) -> None:
        self.shape = DraftShape(decision.steps, decision.branch, decision.num_draft) if decision.speculate else None

    def _drafter(self) -> Drafter | None:
        params = self.params
        if params.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {params.drafter!r}; one of {', '.join(DRAFTERS)}")
        if params.drafter == "ngram":
            return NgramDrafter()
        if params.drafter == "none":
            return None
        if not params.model_path:
            raise ValueError("drafter 'eagle' needs model_path: the target checkpoint whose embeddings, "
                             "final norm and lm_head the head shares")
        target = load_target_parts(params.model_path, params.device)
        if params.draft_path:
            head = EagleHead.load(params.draft_path, target)
        else:
            torch.manual_seed(params.seed)
            head = EagleHead.for_target(target)
        return EagleDrafter(target, head.eval(), params.feature_window)

    @handles(DraftWeights, optional=True)
    async def on_draft_weights(self, weights: DraftWeights, envelope: Envelope) -> None:
        if self.book.drafter is None:
            return
        try:
            self.book.drafter.load_weights(handle_tensors(weights.handle), weights.version)
            self.log.info("draft_weights_loaded", version=weights.version)
        except (ValueError, OSError, RuntimeError) as error:  # a bad update must not cost the rows in flight
            self.log.warning("draft_weights_not_loaded", version=weights.version, error=f"{type(error).__name__}: {error}")

    @handles(PolicyWeights, optional=True)
    async def on_policy_weights(self, weights: PolicyWeights, envelope: Envelope) -> None:
        """A new policy: refresh the target parts the EAGLE head shares (only those keys)."""
        drafter = self.book.drafter
        if not isinstance(drafter, EagleDrafter):
            return
        try:
            fresh = handle_tensors(weights.handle, SHARED_TENSORS)
        except (ValueError, OSError) as error:  # keep drafting with the old parts: costs acceptance only
            self.log.warning("draft_target_parts_not_loaded", version=weights.version, error=str(error))
            return
        parts = drafter.head.target
        with torch.no_grad():
            for name, tensor in zip(SHARED_TENSORS, (parts.embed.weight, parts.norm.weight, parts.lm_head.weight),
                                    strict=True):
                if name in fresh:
                    tensor.copy_(fresh[name])
        self.log.info("draft_target_parts_loaded", version=weights.version, tensors=sorted(fresh))

    async def run(self) -> None:
        while True:
            if not self.book.rows and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            await self._step()

    async def _step(self) -> None:
        rows = list(self.book.rows.values())
        admitted = [self.waiting.popleft() for _ in range(min(len(self.waiting), self._free_rows()))]
        started = time.perf_counter()  # drafting included: the Scheduler weighs the whole SD step
        request = self._request(rows, admitted)
        result: VerifyResult = await self.request(request)
        version = result.policy_version
        for rejected in result.rejected:
            await self._reject(admitted[rejected.index], rejected)
        refused = {rejected.index for rejected in result.rejected}
        admitted = [prompt for index, prompt in enumerate(admitted) if index not in refused]
        new_rows = [self._open(int(slot), prompt) for slot, prompt in zip(result.slots[: len(admitted)], admitted,
                                                                            strict=True)]
        verified = _verified(result, self.params.device)
        done = []
        for b, row in enumerate(new_rows):  # one by one: each keeps exactly its own prompt's features
            done += self.book.apply([row], _select(verified, slice(b, b + 1), result.feature_counts), is_step=False)
        done += self.book.apply(rows, _select(verified, slice(len(admitted), None)))
        for row in new_rows + rows:
            self.versions[row.row_id] += [version] * (len(row.tokens) - len(self.versions[row.row_id]))
        for row in done:
            await self._finish(row)
        self.step_count += 1
        if rows and self.params.stats_every and self.step_count % self.params.stats_every == 0:
            await self._stats(rows, _select(verified, slice(len(admitted), None)), time.perf_counter() - started)

    def _free_rows(self) -> int:
        return self.params.max_rows - len(self.book.rows)

    def _request(self, rows: list[Row], admitted: list[Prompt]) -> VerifyRequest:
        shape = self.shape if rows else None  # nothing to draft for (a step of new rows only)
        tree, draft_probs = self.book.draft(rows, shape)
        roots = torch.tensor([row.tokens[-1] for row in rows], dtype=torch.long)
        freed, self.freed = self.freed, []
        return VerifyRequest(
            step=self.step_count, slots=np.array([r.slot for r in rows], dtype=np.int32),
            tokens=tree.verify_tokens(roots.to(tree.device)).cpu().numpy().astype(np.int32),
            parents=tree.parents.cpu().numpy().astype(np.int32), num_nodes=tree.num_nodes.cpu().numpy().astype(np.int32),
            draft_probs=None if draft_probs is None else draft_probs.float().cpu().numpy(),
            new_rows=admitted, finished_slots=np.array(freed, dtype=np.int32),
            capture_layers=self.capture_layers, feature_window=self.book.feature_window if self.capture_layers else 0,
        )

    def _open(self, slot: int, prompt: Prompt) -> Row:
        row = self.book.open(slot, torch.from_numpy(np.asarray(prompt.tokens, np.int64)), prompt.sampling)
        self.prompts[row.row_id] = prompt
        self.versions[row.row_id] = []
        self.started[row.row_id] = time.perf_counter()
        return row

    async def _finish(self, row: Row) -> None:
        self.freed.append(row.slot)
        prompt = self.prompts.pop(row.row_id)
        rollout = Rollout(
            prompt=prompt, tokens=np.array(row.tokens, dtype=np.int32), logprobs=np.array(row.logprobs, dtype=np.float32),
            token_versions=np.array(self.versions.pop(row.row_id), dtype=np.int32), finish_reason=row.finish_reason,
            accept_len=(len(row.tokens) - 1) / max(row.steps, 1), gen_time_s=time.perf_counter() - self.started.pop(row.row_id),
        )
        await self.send(rollout, correlation_id=prompt.prompt_id)

    async def _reject(self, prompt: Prompt, rejected: RejectedRow) -> None:
        """The Verifier refused this prompt: an empty Rollout that says why, so every prompt
        sent still gets exactly one Rollout (group bookkeeping downstream stays whole)."""
        self.log.warning("prompt_rejected", prompt_id=prompt.prompt_id, error=rejected.error)
        empty = np.zeros(0, dtype=np.int32)
        await self.send(Rollout(prompt=prompt, tokens=empty, logprobs=empty.astype(np.float32), token_versions=empty,
                                finish_reason="error", error=rejected.error), correlation_id=prompt.prompt_id)

    async def _stats(self, rows: list[Row], verified: Verified, seconds: float) -> None:
        """The step just timed: `rows` are the rows that were drafted for and verified (not
        the ones admitted this step, which emit one prefill token, nor the batch after
        finished rows left)."""
        await self.send(GenerationStats(
            active_rows=len(rows), waiting_prompts=len(self.waiting),
            config=self.shape.name if self.shape else "nosd", step_time_s=seconds,
            tokens_emitted=int(verified.num_tokens.sum()),
            mean_accept_len=float(verified.num_tokens.float().mean()) if len(verified.num_tokens) else 0.0,
            context_len_mean=float(np.mean([len(r.prompt) + len(r.tokens) for r in rows])) if rows else 0.0,
        ))


def _verified(result: VerifyResult, device: str) -> Verified:
    tokens = torch.from_numpy(np.asarray(result.tokens, np.int64))
    accepted = torch.from_numpy(np.asarray(result.num_accepted, np.int64))
    features = None if result.features is None else torch.as_tensor(result.features).to(device)
    return Verified(tokens, torch.from_numpy(np.asarray(result.logprobs, np.float32)), accepted + 1, accepted, features)


def _select(verified: Verified, rows: slice, feature_counts=None) -> Verified:
    """Rows of a Verified; with feature_counts (one selected row), only its valid features."""
    features = None if verified.features is None else verified.features[rows]
    if features is not None and feature_counts is not None:
        features = features[:, : int(feature_counts[rows.start])]
    return Verified(verified.tokens[rows], verified.logprobs[rows], verified.num_tokens[rows], verified.num_accepted[rows],
                    features)


def load_target_parts(directory: str | Path, device: str = "cpu") -> CausalLM:
    """The target with only what an EAGLE head shares loaded (embeddings, final norm,
    lm_head, float32); the decoder layers stay on the meta device: no memory, and running
    them fails loudly instead of computing garbage."""
    directory = Path(directory)
    config = ModelConfig.from_file(directory / "config.json")
    with torch.device("meta"):
        model = CausalLM(config)
    names = [n for n in SHARED_TENSORS if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    tensors = _read_tensors(directory, names, device)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def _read_tensors(directory: Path, names: list[str], device: str) -> dict[str, torch.Tensor]:
    """Named tensors from a single-file or sharded safetensors checkpoint, float32."""
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text()).get("weight_map", {})
        files = {name: directory / weight_map.get(name, SINGLE_FILE) for name in names}
    else:
        files = dict.fromkeys(names, directory / SINGLE_FILE)
    tensors = {}
    for name, path in files.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (looking for {name!r})")
        with safe_open(str(path), framework="pt", device=str(device)) as file:
            if name not in file.keys():
                raise CheckpointError(f"{path}: tensor {name!r} is missing")
            tensors[name] = file.get_tensor(name).float()
    return tensors


def handle_tensors(handle: WeightsHandle, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a weights message points at (only `names` of them, when given)."""
    if handle.kind == "local":
        items = (handle.tensors or {}).items()
        return {k: torch.as_tensor(v) for k, v in items if names is None or k in names}
    if handle.kind == "file":
        with safe_open(handle.location, framework="pt") as file:
            return {k: file.get_tensor(k) for k in file.keys() if names is None or k in names}
    raise ValueError(f"weights of kind {handle.kind!r} are not supported by the Generator yet")
