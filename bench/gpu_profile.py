"""Which kernels one fast-path step launches on a GPU, and what each costs: a random model
of a Qwen2.5 shape, one decoding step (k = 0) and SD steps (k > 0) under torch.profiler.

    python3 bench/gpu_profile.py [--shape 0.5b] [--batch 64] [--ks 0,2,4] [--table]

Prints, per k, the graph-replayed step time beside the eager one, then the step's kernel
time split by phase (the head's drafting, the verification pass, acceptance and
bookkeeping, the head's catch-up pass over the committed tokens): kernels launched and
the sum of their durations. Triton's kernels are not tied to the phase that launched
them: their count and time are "unattributed". On a graph replay the GPU runs the same
kernels back to back, so the sums say where a replayed step's time goes. --table adds
torch's kernel table.
A tool for making the fast path faster, not a result.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_train import random_model, shape_config  # noqa: E402

import respec.engine.fast.chain_step as chain_module  # noqa: E402
from respec.engine.drafters.eagle import EagleHead  # noqa: E402
from respec.engine.fast import FastGenerator  # noqa: E402
from respec.engine.fast.fused import FusedModel  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402

# chain_step's pieces, each timed under its own label (the rest of the step is "bookkeeping").
PHASES = {"_draft_chain": "draft", "_accept": "accept", "_record": "record", "_catch_up": "catch_up"}


@contextlib.contextmanager
def labelled_phases():
    """Wrap chain_step's pieces and the verification pass in record_function labels."""
    originals = {name: getattr(chain_module, name) for name in PHASES}
    original_run = FusedModel.run

    def labelled(label, function):
        def call(*args, **kwargs):
            with record_function(label):
                return function(*args, **kwargs)
        return call

    for name, label in PHASES.items():
        setattr(chain_module, name, labelled(label, originals[name]))
    FusedModel.run = labelled("verify", original_run)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(chain_module, name, function)
        FusedModel.run = original_run


def kernels_under(event) -> list:
    """The device kernels an event (a CPU range) launched, its children's included."""
    found = list(getattr(event, "kernels", []))
    for child in event.cpu_children:
        found += kernels_under(child)
    return found


def phase_split(prof, labels: list[str]) -> dict[str, tuple[int, float]]:
    """label -> (kernels, microseconds of kernel time), and "step" for the whole step."""
    split = {}
    top = [e for e in prof.events() if e.name == "step" and e.device_type.name == "CPU"]
    for label in ["step", *labels]:
        events = top if label == "step" else [e for e in prof.events() if e.name == label and e.device_type.name == "CPU"]
        kernels = [kernel for event in events for kernel in kernels_under(event)]
        split[label] = (len(kernels), sum(kernel.duration for kernel in kernels))
    # Kernels the profiler could not tie to a CPU range: Triton's launches are not tied to
    # the range around them, so the GEMV route's kernels land here. The ranges' own GPU-side
    # spans (same names) are not kernels.
    every = [e for e in prof.events() if e.device_type.name == "CUDA" and e.name not in ("step", *labels)]
    split["unattributed"] = (len(every) - split["step"][0], sum(e.device_time for e in every) - split["step"][1])
    return split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ks", default="0,4", help="draft lengths to profile, comma-separated")
    parser.add_argument("--table", action="store_true", help="also print torch's kernel table per k")
    parser.add_argument("--no-kernels", action="store_true", help="the layers in PyTorch's kernels, not Triton's")
    args = parser.parse_args()
    use_kernels = not args.no_kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(shape_config(args.shape, char_tokenizer().vocab_size), device)
    head = EagleHead.for_target(model).eval()
    b = args.batch
    labels = ["draft", "verify", "accept", "record", "catch_up"]
    print(f"{args.shape} shape, batch {b}, {'Triton kernels' if use_kernels else 'PyTorch layers'}; "
          "kernel time in us (kernels launched)")
    ks = [int(k) for k in args.ks.split(",")]
    for k in ks:
        eager = FastGenerator(model, head if k else None, max_rows=b, max_len=256, max_new=128, max_k=max(ks),
                              graphs=False, kernels=use_kernels)
        graphed = FastGenerator(model, head if k else None, max_rows=b, max_len=256, max_new=128, max_k=max(ks),
                                kernels=use_kernels)
        graphed_ms = graphed.time_step(b, k, 50) * 1e3
        eager_ms = eager.time_step(b, k, 10) * 1e3
        eager.start([[1, 2, 3, 4, 5, 6, 7, 8]] * b)  # one more step below, on a started state
        eager.state.done[:b] = False
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with labelled_phases(), profile(activities=activities) as prof:
            with record_function("step"):
                eager.step(b, k)
            if device == "cuda":
                torch.cuda.synchronize()
        split = phase_split(prof, labels)
        count, total = split["step"]
        rest = (count - sum(split[label][0] for label in labels), total - sum(split[label][1] for label in labels))
        pieces = "  ".join(f"{label} {split[label][1]:.0f} ({split[label][0]})" for label in labels)
        print(f"k={k}: graphed {graphed_ms:.3f} ms, eager {eager_ms:.3f} ms; kernels {total:.0f} us ({count}): "
              f"{pieces}  bookkeeping {rest[1]:.0f} ({rest[0]}); unattributed {split['unattributed'][1]:.0f} "
              f"({split['unattributed'][0]})")
        if args.table:
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))


if __name__ == "__main__":
    main()
