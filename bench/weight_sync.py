"""Weight-sync time for the Qwen2.5-0.5B shape across two GPUs, against the link's bandwidth.

    python bench/weight_sync.py --json weight_sync.json          # 2 GPUs: cuda:0 -> cuda:1
    python bench/weight_sync.py --cpu --shape tiny               # CPU check: file + gloo

Times publish -> receive-and-copy into the receiver's weights (a process on the other
device, started with torch.multiprocessing spawn) for (a) cuda_ipc, (b) a collective
broadcast (NCCL on GPUs, gloo with --cpu), (c) the safetensors file snapshot, and
measures the GPU0 -> GPU1 link with a plain `tensor.to("cuda:1")` of 1 GiB in the same
run. Each mode runs in a fresh receiver process; a mode that fails or hangs is recorded
as an error and the others still run. Imports only torch, numpy, safetensors and
respec/runtime/weights_transfer.py (loaded by path: respec.runtime's package imports zmq).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

MODULE = Path(__file__).resolve().parents[1] / "respec" / "runtime" / "weights_transfer.py"
MODULE_NAME = "respec_weights_transfer"

# Qwen2.5-0.5B (bench/gpu_train.py SHAPES["0.5b"]); "tiny" checks the script on a CPU.
SHAPES = {
    "0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, head_dim=64, vocab=151936),
    "tiny": dict(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, head_dim=16, vocab=4096),
}


def load_module():
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, MODULE)
    module = sys.modules[MODULE_NAME] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weight_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """A Qwen2 state dict's names and shapes (tied embeddings: no lm_head)."""
    s = SHAPES[name]
    h, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
    shapes = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (s["heads"] * s["head_dim"], h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, s["heads"] * s["head_dim"]),
            p + "mlp.gate_proj.weight": (s["intermediate"], h), p + "mlp.up_proj.weight": (s["intermediate"], h),
            p + "mlp.down_proj.weight": (h, s["intermediate"]),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    return shapes


def make_weights(shape: str, device: str, version: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(version)
    return {name: torch.randn(size, generator=generator, device=device, dtype=torch.float32).to(torch.bfloat16)
            for name, size in weight_shapes(shape).items()}


def refill(weights: dict[str, torch.Tensor], version: int) -> None:
    """A new version in place (what an optimizer step does), cheap."""
    for tensor in weights.values():
        tensor.add_(float(version % 7 + 1) / 64)


def checksum(weights: dict[str, torch.Tensor]) -> int:
    """Exact: the sum of every weight's raw 16-bit patterns."""
    return int(sum(int(t.contiguous().view(torch.int16).sum(dtype=torch.int64)) for t in weights.values()))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- receiver


def receiver(mode: str, shape: str, device: str, inbox, outbox) -> None:
    """Holds the receiving model's weights on `device`; copies each version in, in place."""
    torch.set_num_threads(1)
    try:
        wt = load_module()
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        target = {name: torch.zeros(size, dtype=torch.bfloat16, device=device)
                  for name, size in weight_shapes(shape).items()}
        sync(device)
        outbox.put(("ready",))
        while (job := inbox.get()) is not None:
            kind, version, handle = job
            if kind == "checksum":
                outbox.put(("checksum", checksum(target)))
                continue
            if kind == "file":
                from safetensors import safe_open

                with safe_open(handle, framework="pt", device=device) as file, torch.no_grad():
                    for name in file.keys():
                        target[name].copy_(file.get_tensor(name))
            else:
                with wt.opened(handle, version, device=device) as tensors, torch.no_grad():
                    for name, tensor in tensors.items():
                        target[name].copy_(tensor, non_blocking=True)
                    sync(device)
            sync(device)
            outbox.put(("done", version))
    except BaseException:  # noqa: BLE001 (reported to the parent)
        outbox.put(("error", traceback.format_exc()))


# ---------------------------------------------------------------------------- modes


def run_mode(mode: str, args, weights: dict[str, torch.Tensor], source: str, target: str, nbytes: int) -> dict:
    wt = load_module()
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=receiver, args=(mode, args.shape, target, inbox, outbox), daemon=True)
    process.start()
    publisher = None
    result: dict = {"mode": mode, "bytes": nbytes}
    tmp = Path(tempfile.mkdtemp(prefix="weight_sync-"))
    try:
        reply(outbox, args.timeout, "ready")
        if mode == "cuda_ipc":
            publisher = wt.CudaIpcPublisher(keep=2)
        elif mode == "collective":
            publisher = wt.CollectivePublisher(receivers=1, device=source, timeout_s=args.timeout)
            result["backend"] = publisher.backend
        times, publish_times = [], []
        for version in range(1, args.repeats + 2):  # the first one warms up (group, IPC mapping, allocator)
            refill(weights, version)
            sync(source)
            started = time.perf_counter()
            if mode == "file":
                from safetensors.torch import save_file

                path = tmp / f"policy-v{version}.safetensors"
                save_file(weights, str(path))
                handle = str(path)
            else:
                handle = publisher.publish(weights, version)
            published = time.perf_counter()
            inbox.put((mode, version, handle))
            reply(outbox, args.timeout, "done")
            finished = time.perf_counter()
            if mode == "file":
                (tmp / f"policy-v{version - 1}.safetensors").unlink(missing_ok=True)
            (times if version > 1 else result.setdefault("first", [])).append(finished - started)
            if version > 1:
                publish_times.append(published - started)
        inbox.put(("checksum", 0, None))
        expected = checksum(weights)
        got = reply(outbox, args.timeout, "checksum")[1]
        result.update(seconds=statistics.median(times), seconds_all=times, first_s=result.pop("first")[0],
                      publish_s=statistics.median(publish_times), bit_identical=got == expected)
    except BaseException as error:  # noqa: BLE001 (one mode failing must not cost the others)
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        if "error" not in result:
            inbox.put(None)
            process.join(timeout=20)
        if process.is_alive():
            process.kill()
        if publisher is not None and hasattr(publisher, "close"):
            publisher.close()
        for path in tmp.glob("*"):
            path.unlink()
        tmp.rmdir()
    return result


def reply(outbox, timeout: float, expected: str):
    message = outbox.get(timeout=timeout)
    if message[0] == "error":
        raise RuntimeError(f"receiver failed:\n{message[1]}")
    if message[0] != expected:
        raise RuntimeError(f"receiver said {message[0]!r}, expected {expected!r}")
    return message


def link_bandwidth(source: str, target: str, repeats: int = 5) -> dict:
    """Bytes/s of a plain 1 GiB `tensor.to(target)` (median of `repeats` after a warm-up)."""
    nbytes = 1 << 30 if source.startswith("cuda") else 1 << 26
    x = torch.empty(nbytes, dtype=torch.uint8, device=source)
    x.to(target)
    sync(source), sync(target)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        y = x.to(target) if target != source else x.clone()
        sync(target)
        times.append(time.perf_counter() - started)
        del y
    seconds = statistics.median(times)
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="file and gloo between two CPU processes (a check)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--modes", default="", help="comma list of cuda_ipc, collective, file (default: all that apply)")
    parser.add_argument("--repeats", type=int, default=5, help="timed versions per mode (after one warm-up)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a receiver may take for one step")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.cpu else min(8, os.cpu_count() or 1))

    if args.cpu:
        source = target = "cpu"
        modes = ["collective", "file"]
    else:
        if torch.cuda.device_count() < 2:
            sys.exit(f"needs 2 GPUs (found {torch.cuda.device_count()}); --cpu checks the script without")
        source, target = "cuda:0", "cuda:1"
        modes = ["file", "cuda_ipc", "collective"]  # NCCL last: a hang there costs nothing else
    if args.modes:
        modes = [m for m in args.modes.split(",") if m]

    started = time.perf_counter()
    link = link_bandwidth(source, target)
    weights = make_weights(args.shape, source, 0)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    results = [run_mode(mode, args, weights, source, target, nbytes) for mode in modes]

    ideal = nbytes / link["bytes_per_s"]
    print(f"\nweights: {args.shape} bf16, {len(weights)} tensors, {nbytes / 1e6:.1f} MB; {source} -> {target}")
    print(f"link: {link['bytes'] / 2**30:.2f} GiB in {link['seconds'] * 1e3:.2f} ms = "
          f"{link['bytes_per_s'] / 1e9:.1f} GB/s; the weights' bytes over it: {ideal * 1e3:.2f} ms\n")
    print(f"{'mode':<12} {'time ms':>9} {'first ms':>9} {'publish ms':>10} {'bytes':>12} {'GB/s':>7} "
          f"{'x link':>7} {'exact':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<12} error: {r['error'].splitlines()[0][:200]}")
            continue
        r["bytes_per_s"] = r["bytes"] / r["seconds"]
        r["ratio_to_link"] = r["seconds"] / ideal
        name = r["mode"] + (f" ({r['backend']})" if "backend" in r else "")
        print(f"{name:<12} {r['seconds'] * 1e3:>9.2f} {r['first_s'] * 1e3:>9.2f} {r['publish_s'] * 1e3:>10.2f} "
              f"{r['bytes']:>12} {r['bytes_per_s'] / 1e9:>7.2f} {r['ratio_to_link']:>7.2f} "
              f"{str(r['bit_identical']):>6}")
    for r in results:
        if "error" in r:
            print(f"\n{r['mode']} error:\n{r['error']}")
    report = {"shape": args.shape, "source": source, "target": target, "tensors": len(weights), "bytes": nbytes,
              "link": link, "link_ideal_s": ideal, "results": results, "torch": torch.__version__,
              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
              if not args.cpu else [], "wall_s": time.perf_counter() - started, "numpy": np.__version__}
    report["imported_zmq_or_msgspec"] = sorted({"zmq", "msgspec"} & set(sys.modules))
    print(f"\nwall {report['wall_s']:.1f} s; zmq/msgspec imported: {report['imported_zmq_or_msgspec'] or 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
