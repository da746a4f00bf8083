"""Where a policy load's time goes in FastRollouts, on two GPUs: publisher on cuda:1, the
buffers put on the receiver's GPU (cuda:0), as in `configs/gpu_fast.yaml` with the
trainer on a second GPU (docs/PERFORMANCE.md, "The actor graph on two GPUs at 0.48x").

    python3 bench/policy_load.py --json policy_load.json [--versions 20]

A spawned publisher holds the 0.5B shape's weights in float32 (the trainer's dtype) and
publishes a new version on request through `CudaIpcPublisher(keep=3, device="cuda:0")`;
this process holds the same model in bf16 with its fused copies and the Triton kernels,
and loads each version as FastRollouts' `_load_policy` does, timing each phase:

- map: `weights_transfer.receive`, opening the buffers (or finding them mapped) and
  reading the version tag;
- copy: launching the copies into the bf16 policy;
- wait: until the copies ran, then the version tag read again (the torn-copy check);
- refresh: the fused copies rebuilt (`FusedModel.refresh`), until they ran.

Modes: `load_state_dict` copies as FastRollouts did before 2026-11-27 (one copy per
tensor), `copy_in` as it does now (respec.engine.copy_in: one `torch._foreach_copy_`).
Medians are over the loads after the first `keep` (those map new buffer sets). At 75b1fde
this script also timed receivers keeping the buffers mapped between loads: 2.81 ms to map
against 3.02 ms reopening them, no gain, so that change was reverted. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_train import random_model, shape_config  # noqa: E402

from respec.engine.copy_in import copy_in  # noqa: E402
from respec.engine.fast.fused import FusedModel  # noqa: E402
from respec.engine.tokenizer import char_tokenizer  # noqa: E402
from respec.runtime import weights_transfer as wt  # noqa: E402

KEEP = 3
PHASES = ("map_s", "copy_s", "wait_s", "refresh_s", "total_s")


def model_config():
    tokenizer = char_tokenizer()
    return shape_config("0.5b", tokenizer.vocab_size, tokenizer)


def publisher(requests, handles) -> None:
    """Publishes version v on request v (None stops), from float32 weights on cuda:1."""
    torch.cuda.set_device(1)
    model = random_model(model_config(), "cuda:1", torch.float32)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    publisher = wt.CudaIpcPublisher(keep=KEEP, device="cuda:0")
    while (version := requests.get()) is not None:
        with torch.no_grad():
            for tensor in state.values():
                if tensor.is_floating_point():
                    tensor.add_(1e-3)
        handles.put(publisher.publish(state, version))
    handles.put("done")


def load(handle, version: int, model, fused: FusedModel, mode: str) -> dict:
    times = [time.perf_counter()]
    tensors = wt.receive(handle, version, device="cuda:0")
    times.append(time.perf_counter())
    with torch.no_grad():
        if mode == "copy_in":
            copy_in(model, tensors)
        else:
            model.load_state_dict(tensors, strict=False)
    times.append(time.perf_counter())
    torch.cuda.synchronize()
    if wt._tagged_version(handle) != version:
        raise RuntimeError(f"v{version} was written over during the copy")
    tensors.clear()
    times.append(time.perf_counter())
    fused.refresh()
    torch.cuda.synchronize()
    times.append(time.perf_counter())
    phases = [b - a for a, b in zip(times, times[1:], strict=False)]
    return dict(zip(PHASES, [*phases, times[-1] - times[0]], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=20, help="loads per mode")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs (found {torch.cuda.device_count()})")
    torch.cuda.set_device(0)
    model = random_model(model_config(), "cuda:0", torch.bfloat16)
    fused = FusedModel(model, kernels=True)
    context = mp.get_context("spawn")
    requests, handles = context.Queue(), context.Queue()
    process = context.Process(target=publisher, args=(requests, handles), daemon=True)
    process.start()
    version, results = 0, {}
    try:
        for mode in ("load_state_dict", "copy_in"):
            rows = []
            for _ in range(args.versions):
                version += 1
                requests.put(version)
                handle = handles.get(timeout=120)
                rows.append(load(handle, version, model, fused, mode))
            steady = rows[KEEP:]
            results[mode] = {"loads": len(rows), "median": {p: statistics.median(r[p] for r in steady) for p in PHASES},
                             "first_s": rows[0]["total_s"], "rows": rows}
    finally:
        requests.put(None)
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    print(f"\n{'mode':<16}" + "".join(f"{p:>11}" for p in PHASES) + f"{'first_s':>10}")
    for mode, result in results.items():
        print(f"{mode:<16}" + "".join(f"{result['median'][p] * 1e3:>9.2f}ms" for p in PHASES)
              + f"{result['first_s'] * 1e3:>8.1f}ms")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "keep": KEEP,
              "tensors": len(model.state_dict()), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
