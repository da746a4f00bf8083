"""bench/gpu.py's RL part: GRPO steps on one GPU (or two), rollouts by the fast path.

The variants start from the same weights and get the same prompts per step:

- ``sync_nosd`` (the baseline): generate (no drafting), score, one GRPO update;
- ``sync_sd``: the same with the live scheduler's per-bucket draft lengths (step costs
  from the profile, acceptance from the run's own latest rollouts: `LiveChoice`), and
  the head distilled on the rollouts so it follows the policy (reward-weighted KL; its
  gradient computed a slice per step and applied every third, the DraftDistiller's
  update_interval 3);
- ``respec``: ``sync_sd`` made asynchronous as respec's actors are: generation runs on a
  high-priority CUDA stream in one thread while the update (and the distillation) of the
  previous step's rollouts runs on another stream in a second thread. Rollouts are at
  most one policy version stale (generation of step j uses the weights after step j - 2);
  the update corrects for it with the behaviour log-probs, as the PolicyTrainer does.
  New weights are swapped in between generations, never during one (a handshake of two
  CUDA events: the trainer never overwrites weights the generator has not copied yet).

A step's time is the whole run's wall time (first generation to last update) over the
number of steps, so the asynchronous pipeline's fill and drain are paid. Before the timed
variants, a few untimed steps of each kind warm the process, and the baseline runs again
at the end (``sync_nosd_again``): the two baseline rows show how much the timing drifted
during the section. (Without the update's lengths padded to a multiple of 32, the same
baseline's median update took 0.38 s at the start of a run and 0.12 s at its end: a
GPU update of 16 rows is bimodal from step to step, docs/PERFORMANCE.md.)

``respec`` runs with a 0.5 ms interpreter switch interval (``respec_switch_5ms``: the default
5 ms, for comparison): the update thread holds the GIL through thousands of eager kernel
launches, and with the default interval the generation thread waits up to 5 ms for it at
every step of ~2 ms.

In the asynchronous variants a version is published as soon as the policy's update is done,
and the head's share of distillation runs after it: the generation waiting for that version
does not wait for the head (whose update reaches the generator with the next version).
``_whole`` (``respec_whole``, ``respec_2gpu_whole``): the head's update in one call every third
version instead of a slice per version (one call's fixed cost paid once, not three times).

The head distils from what the GRPO update's own forward pass computed for the rollouts
(their hidden states at the head's layers and the logits: TrainerConfig.capture_layers),
not from a target pass of its own, which was 58% of a head update's time on an H100
(bench/train_lane.py); the targets are then the weights before the update, one version
older. ``_target_pass`` (``respec_2gpu_target_pass``): the earlier way, a pass of the
newest weights over the rollouts.

On two GPUs (names with ``_2gpu``): generation stays on the first GPU, the update and
the head's distillation run on the second (the actors' deployment: Generator + Verifier
on one device, PolicyTrainer + DraftDistiller on another), and publishing copies the
trained weights across (peer to peer). ``sync_nosd_2gpu`` is the synchronous baseline on
the same two GPUs (generate on one, update on the other, one after the other),
``async_nosd_2gpu`` the overlap without drafting, ``respec_2gpu`` the overlap with drafting
and distillation. ``sync_nosd_half`` generates and updates half the rollouts on one GPU: a
data-parallel synchronous baseline on two GPUs (each GPU half the rows, gradients
all-reduced) can be no faster than it, so it bounds that baseline from below.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from gpu_distill import captured_views, distill_views, target_views
from gpu_timing import release_cached_memory

from respec.engine.drafters.eagle import EagleHead
from respec.engine.fast import FastGenerator
from respec.engine.model import CausalLM
from respec.engine.tokenizer import char_tokenizer
from respec.rl.trainer import GRPOTrainer, TrainerConfig, TrainSample
from respec.runtime.weights_transfer import flatten, unflatten
from respec.sched.draft_lengths import LiveChoice

DISTILL_SAMPLES = 64  # rollouts per head update at most: the latest ones (one pass). A slice of 128
# took ~0.2 s per version beside a ~0.2 s update (597254b): the training lane then outran the generation.
DISTILL_EVERY = 3  # policy versions per head update (the DraftDistiller's update_interval)
# The head's online learning rate: where its training ended (bench/gpu_train.train_head decays
# 1e-3 to 5e-5). A fresh AdamW's first step moves every parameter by about lr whatever the
# gradient's size; at 3e-4 on the 0.5B shape's 896-wide head, every GPU run up to 597254b
# accepted 13-45% fewer drafts per step right after the first head update than before it.
DISTILL_LR = 5e-5
# The head update's gradient is computed a slice per version (that version's rollouts,
# against that version's weights) and applied every DISTILL_EVERY versions: the same
# amount of work spread evenly. In one piece (597254b) it took 0.54-0.67 s every third
# version, longer than a generation, and the generation waiting for that version stalled.
# Most of that turned out to be a per-call cost (cuDNN's attention, gone since 40c837a: any
# call took 0.5-0.7 s), which slices pay three times: the ``_whole`` variants measure one piece.
VARIANTS = ("sync_nosd", "sync_sd", "respec", "respec_switch_5ms", "sync_nosd_again")
VARIANTS_2GPU = ("sync_nosd_2gpu", "sync_nosd_half", "sync_nosd", "async_nosd_2gpu", "respec_2gpu", "sync_nosd_2gpu_again")
KNOWN_VARIANTS = frozenset(VARIANTS + VARIANTS_2GPU + ("sync_sd_2gpu", "async_nosd", "sync_nosd_2gpu_again",
                                                       "respec_whole", "respec_2gpu_whole", "respec_target_pass",
                                                       "respec_2gpu_target_pass", "respec_2gpu_whole_target_pass"))
WARM_STEPS = 3
LENGTH_MULTIPLE = 32  # update lengths padded to a multiple: few kernel shapes (TrainerConfig.length_multiple)
SWITCH_INTERVAL_S = 5e-4


def rl_section(model: CausalLM, head: EagleHead, task, profile: dict, steps: int, groups: int,
               group_size: int, max_new: int, lr: float, log, variants=VARIANTS, on_variant=lambda out: None) -> dict:
    """Each variant from the same starting weights and prompts; `variants` in the order run.
    `on_variant(out so far)` after each one: a run cut off by a time limit keeps the finished ones."""
    if unknown := set(variants) - KNOWN_VARIANTS:
        raise ValueError(f"unknown RL variants {sorted(unknown)}; known: {', '.join(sorted(KNOWN_VARIANTS))}")
    two_gpus = any(Variant(v).two_gpus for v in variants)
    out = {"groups": groups, "group_size": group_size, "max_new": max_new, "variants": list(variants),
           "distill": {"lr": DISTILL_LR, "samples": DISTILL_SAMPLES, "every": DISTILL_EVERY}}
    warm = ("warm_sync", "warm_async") + (("warm_async_2gpu",) if two_gpus else ())
    for name in (*warm, *variants):
        variant = Variant(name)
        choice = LiveChoice.from_profile(profile, groups * group_size) if variant.drafting else None
        setup = Setup.build(variant, model, head, task, choice, groups, group_size, max_new, lr)
        run = run_async if variant.overlapped else run_sync
        if name.startswith("warm"):  # untimed: the process's (and each GPU's) first updates are slow
            run(setup, WARM_STEPS, log)
        else:
            out[name] = summarise(_with_switch_interval(variant.switch_interval, run, setup, steps, log))
            log(f"rl {name}: {out[name]['step_s']:.3f} s per step, reward "
                f"{out[name]['reward_first']:.3f} -> {out[name]['reward_last']:.3f}")
            on_variant(out)
        del setup
        release_cached_memory("cuda" if torch.cuda.is_available() else "cpu")
    base = out[variants[0]]["step_s"]
    for name in variants[1:]:
        out[f"{name}_step_time_over_{variants[0]}"] = out[name]["step_s"] / base
    return out


@dataclass(frozen=True)
class Variant:
    """What a variant's name says: drafting unless it has ``nosd``; asynchronous if it starts
    with ``respec`` or ``async``; update on a second GPU if it has ``_2gpu``; half the
    prompts per step with ``_half``."""
    name: str

    @property
    def drafting(self) -> bool:
        return "nosd" not in self.name

    @property
    def overlapped(self) -> bool:
        return self.name.startswith(("respec", "async", "warm_async"))

    @property
    def two_gpus(self) -> bool:
        return "_2gpu" in self.name

    @property
    def half(self) -> bool:
        return "_half" in self.name

    @property
    def whole_distill(self) -> bool:
        """``_whole``: the head's update in one call every DISTILL_EVERY versions, not a slice per version."""
        return "_whole" in self.name

    @property
    def target_pass(self) -> bool:
        """``_target_pass``: the head's targets from a pass of its own, not the update's."""
        return self.name.endswith("_target_pass")

    @property
    def switch_interval(self) -> float:
        return SWITCH_INTERVAL_S if self.overlapped and not self.name.endswith("_switch_5ms") else sys.getswitchinterval()


@dataclass
class Setup:
    """One variant's models, optimisers and generator, from the same starting weights."""
    variant: str
    task: object
    infer: CausalLM  # bf16: what generates (the generator's fused copies are refreshed from it)
    master: CausalLM  # float32: what trains
    trainer: GRPOTrainer
    generator: FastGenerator
    live: LiveChoice | None  # None: plain decoding
    groups: int
    group_size: int
    flat_pairs: list[tuple[torch.Tensor, torch.Tensor]]  # (generator's weights, trainer's), each one flat tensor
    draft: EagleHead | None = None
    draft_master: EagleHead | None = None
    draft_optimizer: torch.optim.Optimizer | None = None
    whole_distill: bool = False
    target_pass: bool = False  # the head's targets from a pass of their own (else the update's: ``captured``)
    # Rollouts not yet distilled (``_whole``: since the last head update): samples with
    # ``target_pass``, else the update's views of them with their rewards.
    pending: list = field(default_factory=list)

    @staticmethod
    def build(variant: Variant, model, head, task, choice, groups, group_size, max_new, lr) -> Setup:
        """Generation on `model`'s device; the update there too, or on the second GPU."""
        eos = char_tokenizer().eos_id
        groups = max(1, groups // 2) if variant.half else groups
        train_device = torch.device("cuda", 1) if variant.two_gpus else next(model.parameters()).device
        infer = copy.deepcopy(model)
        master = copy.deepcopy(model).float().train().to(train_device)
        pairs = [(flatten_parameters(infer), flatten_parameters(master))]  # before anything keeps a parameter
        draft = draft_master = draft_optimizer = None
        if variant.drafting:
            draft = _head_for(infer, head)
            # The trained head reads the trainer's own embeddings and output head (same device).
            draft_master = _head_for(master, head).float().train()
            pairs.append((flatten_parameters(draft), flatten_parameters(draft_master)))
            draft_optimizer = torch.optim.AdamW(draft_master.parameters(), lr=DISTILL_LR)
        generator = FastGenerator(infer, draft, max_rows=groups * group_size, max_len=80 + max_new + 8,
                                  max_new=max_new, max_k=6 if variant.drafting else 0, temperature=1.0, eos_ids=(eos,))
        captured = draft_master.capture_layers if variant.drafting and not variant.target_pass else ()
        trainer = GRPOTrainer(master, TrainerConfig(lr=lr, micro_batch=64, length_multiple=LENGTH_MULTIPLE,
                                                    capture_layers=captured))
        return Setup(variant.name, task, infer, master, trainer, generator, choice if variant.drafting else None,
                     groups, group_size, pairs, draft, draft_master, draft_optimizer, variant.whole_distill,
                     variant.target_pass)

    @property
    def drafting(self) -> bool:
        return self.draft is not None

    def problems(self, step: int):
        return [self.task.sample(random.Random(f"rl/{step}/{g}")) for g in range(self.groups)]

    def prompts(self, problems) -> list[list[int]]:
        tokenizer = char_tokenizer()
        return [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] for p in problems for _ in range(self.group_size)]

    def choice(self) -> dict[int, int] | int:
        return self.live.choice if self.live is not None else 0

    def warm_up(self) -> None:
        """Capture every graph generation will need (every bucket with every draft length the
        live choice may pick, the prefill widths of any prompt) before the timed steps:
        capture synchronises the device and must not overlap the trainer's work."""
        prompts = self.prompts(self.problems(-1))
        self.generator.generate(prompts, self.choice())
        b = self.generator.bucket_for(len(prompts))
        lengths = self.live.lengths if self.live is not None else [0]
        self.generator.capture([(size, k) for size in self.generator.buckets for k in lengths])
        for width in range(16, 65, 16):
            self.generator.capture([], (b, width))

    def generate(self, step: int) -> tuple[list, list[TrainSample], dict]:
        problems = self.problems(step)
        prompts = self.prompts(problems)
        started = time.perf_counter()
        choice = self.choice()
        results = self.generator.generate(prompts, choice)
        gen_s = time.perf_counter() - started
        if self.live is not None:
            self.live.observe(self.generator.chains, sum(r.accepted for r in results))
        tokenizer = char_tokenizer()
        rewards = [self.task.check(tokenizer.decode([t for t in r.tokens if t != tokenizer.eos_id]),
                                   problems[i // self.group_size]).reward for i, r in enumerate(results)]
        samples = [TrainSample(torch.tensor(p), torch.tensor(r.tokens), torch.tensor(r.logprobs), reward,
                               str(i // self.group_size))
                   for i, (p, r, reward) in enumerate(zip(prompts, results, rewards, strict=True))]
        record = {"step": step, "reward": sum(rewards) / len(rewards), "gen_s": gen_s,
                  "tokens": sum(len(r.tokens) for r in results), "longest": max(len(r.tokens) for r in results),
                  "accepted_per_step": sum(r.accepted for r in results) / max(1, sum(r.steps for r in results)),
                  "k_full": choice if isinstance(choice, int) else choice[max(choice)],
                  "k_one": choice if isinstance(choice, int) else choice[1],
                  "acceptance_rate": self.live.rate if self.live is not None else 0.0}
        return results, samples, record

    def update(self, step: int, samples: list[TrainSample]) -> dict:
        """One GRPO update of the master weights, and the head's distillation when due."""
        return {**self.train(samples), **self.distill(step, samples)}

    def train(self, samples: list[TrainSample]) -> dict:
        """One GRPO update of the master weights."""
        started = time.perf_counter()
        stats = self.trainer.step(samples)  # under bf16 autocast on a GPU (TrainerConfig.bf16_on_gpu)
        _sync(self.master)
        return {"train_s": time.perf_counter() - started,
                **{key: stats.get(key, 0.0) for key in ("grad_norm", "skipped", "behaviour_weight_mean", "loss")}}

    def distill(self, step: int, samples: list[TrainSample]) -> dict:
        """The head's share of distillation for this version: a slice of its gradient (the
        latest rollouts, against the update's pass over them, or with `target_pass` a pass
        of the newest weights), applied every DISTILL_EVERY versions; or, with
        `whole_distill`, all of it in one call every DISTILL_EVERY versions. Call it after
        `train` on the same samples."""
        started = time.perf_counter()
        due = step % DISTILL_EVERY == 0
        if self.drafting:
            first = max(0, len(samples) - DISTILL_SAMPLES // DISTILL_EVERY)
            self.pending += samples[first:] if self.target_pass else captured_views(self.trainer.captured, samples, first)
        if self.pending and (due or not self.whole_distill):
            pending, self.pending = self.pending, []
            views = target_views(self.master, self.draft_master, pending) if self.target_pass else pending
            distill_views(self.draft_master, self.draft_optimizer, views,
                          scale=1.0 if self.whole_distill else 1 / DISTILL_EVERY, apply=due)
            _sync(self.master)
        return {"distill_s": time.perf_counter() - started}

    def publish(self) -> None:
        """Write the master weights (and head) into the generator's source copies: one cast
        and copy per model (across GPUs, peer to peer), in place (the fast path's graphs read
        these tensors). One call, not one per tensor: beside the generation thread each of
        ~290 copies waited for the GIL, and a publish took 0.17-0.28 s instead of 0.007."""
        with torch.no_grad():
            for ours, theirs in self.flat_pairs:
                ours.copy_(theirs)


def run_sync(setup: Setup, steps: int, log) -> list[dict]:
    setup.warm_up()
    history = []
    _sync(setup.infer)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        _, samples, record = setup.generate(step)
        record.update(setup.update(step, samples))
        published = time.perf_counter()
        setup.publish()
        setup.generator.refresh_weights()
        _sync(setup.infer)
        record["publish_s"] = time.perf_counter() - published  # across GPUs too in the _2gpu variants
        record["wall_s"] = time.perf_counter() - started
        history.append(record)
        log(f"rl {setup.variant} step {step}: " + _fmt(record))
    return history


def run_async(setup: Setup, steps: int, log) -> list[dict]:
    """Generation of step j (weights after update j - 2) beside update j - 1: two threads,
    each on its own stream of its own GPU (the same GPU unless the variant has two)."""
    setup.warm_up()
    gen_device, train_device = _device(setup.infer), _device(setup.master)
    cuda = gen_device.type == "cuda"
    gen_stream = torch.cuda.Stream(gen_device, priority=-1) if cuda else None  # generation first when both wait
    train_stream = torch.cuda.Stream(train_device, priority=0) if cuda else None
    rollouts: queue.Queue = queue.Queue()
    published: queue.Queue = queue.Queue()  # (version, event): weights written into infer
    consumed: queue.Queue = queue.Queue()  # event: the generator has copied them
    failures: list[BaseException] = []
    history: dict[int, dict] = {}
    _sync(setup.infer)
    started = time.perf_counter()

    def generating():
        with _on(gen_device, gen_stream):
            for step in range(1, steps + 1):
                if step >= 3:  # the weights after update step - 2
                    version, written = published.get()
                    if version is None:
                        return
                    _wait(gen_stream, written)
                    setup.generator.refresh_weights()
                    consumed.put(_record(gen_stream))
                _, samples, record = setup.generate(step)
                record["policy_version"] = step - 2 if step >= 3 else 0
                history[step] = record
                rollouts.put((step, samples))

    def training():
        with _on(train_device, train_stream):
            for step in range(1, steps + 1):
                _, samples = rollouts.get()
                if samples is None:  # the generating thread failed
                    return
                history[step].update(setup.train(samples))
                if step <= steps - 2:  # versions a later generation reads
                    if step >= 2:
                        _wait(train_stream, consumed.get())
                    published.put((step, _publish(setup, train_stream, history[step])))
                # After the publish: the generation waiting for this version need not wait for
                # the head too (its update reaches the generator with the next version).
                history[step].update(setup.distill(step, samples))
                history[step]["wall_s"] = time.perf_counter() - started
                log(f"rl {setup.variant} step {step}: " + _fmt(history[step]))

    threads = [threading.Thread(target=_guard(fn, failures, published, rollouts)) for fn in (generating, training)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return [history[step] for step in range(1, steps + 1)]


def _publish(setup: Setup, stream, record: dict):
    """Write the trained weights into the generator's source copies on `stream` (across
    GPUs: a peer copy); returns the event the generator waits for before reading them."""
    started = time.perf_counter()
    setup.publish()
    event = _record(stream)
    if stream is not None:
        event.synchronize()  # only to time it: the generator waits on the event, not on this
    record["publish_s"] = time.perf_counter() - started
    return event


def _with_switch_interval(seconds: float, run, *args):
    default = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        return run(*args)
    finally:
        sys.setswitchinterval(default)


def summarise(history: list[dict]) -> dict:
    n = len(history)
    mean = {key: sum(h.get(key, 0.0) for h in history) / n for key in ("gen_s", "train_s", "distill_s", "publish_s",
                                                                      "tokens", "longest", "accepted_per_step")}
    head = history[: max(1, n // 3)]
    tail = history[-max(1, n // 3):]
    return {"steps": history, "step_s": history[-1]["wall_s"] / n, "mean": mean,
            "reward_first": head[0]["reward"], "reward_last": tail[-1]["reward"],
            "reward_first_third": sum(h["reward"] for h in head) / len(head),
            "reward_last_third": sum(h["reward"] for h in tail) / len(tail),
            "reward_mean": sum(h["reward"] for h in history) / n,
            "skipped_updates": int(sum(h.get("skipped", 0.0) for h in history))}


def _guard(fn, failures, *queues):
    """A failing thread stops the other instead of leaving it blocked on a queue."""
    def run():
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - re-raised by run_async
            failures.append(error)
            for q in queues:
                q.put((None, None))
    return run


@contextlib.contextmanager
def _on(device: torch.device, stream):
    """This thread's work on `device` (the current device is per thread) and `stream`."""
    if stream is None:
        yield
        return
    torch.cuda.set_device(device)
    with torch.cuda.stream(stream):
        yield


def _record(stream):
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _wait(stream, event) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)


def _fmt(record: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step")


def _sync(model: torch.nn.Module) -> None:
    """Waits for this thread's stream on the model's GPU only (the other thread's work goes on)."""
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head_for(target: CausalLM, trained: EagleHead) -> EagleHead:
    head = EagleHead.for_target(target, trained.capture_layers)
    head.load_state_dict(trained.state_dict())
    return head.eval()


def flatten_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Moves every parameter of `module` into one flat tensor (each parameter becomes a view
    of it, same values: the runtime's weight packing, `flatten` / `unflatten`) and returns
    it: a whole model is then copied with one call. Must run before anything keeps a
    parameter's storage (fused copies, optimisers, captured graphs)."""
    parameters = dict(module.named_parameters())
    specs, buffers = flatten({name: p.detach() for name, p in parameters.items()})
    if len(buffers) != 1:
        raise ValueError(f"parameters of {len(buffers)} dtypes; one flat tensor needs one")
    for name, view in unflatten(specs, buffers).items():
        parameters[name].data = view
    return buffers[0]
