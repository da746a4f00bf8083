"""Weights across processes: the collective path over gloo, cuda_ipc handles, run.weights."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from respec.messages import SCHEMA_VERSION, Envelope, PolicyWeights, codec
from respec.runtime import weights_route
from respec.runtime import weights_transfer as wt
from respec.runtime.graph import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]


def encode(body) -> list[bytes]:
    envelope = Envelope(SCHEMA_VERSION, "trainer/0#1", type(body).__name__, "trainer/0", time.time(),
                        policy_version=body.version)
    return [bytes(frame) for frame in codec.encode(envelope, body)]


def decode(frames):
    return codec.decode(frames)[1]


@pytest.fixture
def spawnable(monkeypatch):
    """Spawned children import this test module by name (tests/ is a namespace package)."""
    monkeypatch.syspath_prepend(str(ROOT))  # spawn hands the children this sys.path


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "layers.0.norm.weight": torch.randn(8, generator=g),
            "layers.0.proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
            "scale": torch.randn(3, 2, generator=g).double()}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor (bit identity, bf16 included)."""
    return tensor.contiguous().view(torch.uint8).numpy().copy()


def _receiver(inbox, outbox) -> None:
    torch.set_num_threads(1)
    from respec.runtime import weights_transfer

    def decode_message(frames):
        return codec.decode(frames)[1]

    while (data := inbox.get()) is not None:
        message = decode_message(data)  # the announcement as it travels: version + handle
        tensors = weights_transfer.receive(message.handle, message.version)
        outbox.put((message.version, {k: (str(t.dtype), list(t.shape), _bits(t)) for k, t in tensors.items()},
                    len(weights_transfer._RECEIVERS)))
    outbox.close()
    outbox.join_thread()
    os._exit(0)  # a gloo group torn down at interpreter exit may abort (std::terminate) while its peer lives


def test_collective_gloo_two_processes_bit_identical_in_order_group_reused(spawnable):
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=_receiver, args=(inbox, outbox), daemon=True)
    process.start()
    publisher = wt.CollectivePublisher(receivers=1, timeout_s=30)
    try:
        for version in (1, 2, 3):
            weights = _weights(version)
            handle = wt.as_message(publisher.publish(weights, version))
            assert handle.kind == "collective" and handle.backend == "gloo"
            assert handle.location == publisher.location  # only the rendezvous address travels
            inbox.put(encode(PolicyWeights(version=version, handle=handle)))
            got_version, got, groups = outbox.get(timeout=30)
            assert got_version == version
            assert groups == 1  # the second and third updates reuse the group
            assert set(got) == set(weights)
            for name, tensor in weights.items():
                dtype, shape, bits = got[name]
                assert dtype == str(tensor.dtype) and shape == list(tensor.shape)
                assert np.array_equal(bits, _bits(tensor)), name
        publisher.flush()
        assert publisher.sent == 3
    finally:
        inbox.put(None)
        process.join(timeout=30)
        publisher.close()
    assert process.exitcode == 0


def test_collective_publisher_process_reads_its_own_buffers():
    # No receiver ever joins, so the group is never formed: a timeout that expired while the
    # tests still ran aborted the whole pytest process (std::terminate in gloo's thread,
    # exit code 134), so the wait outlasts any session and dies with the process.
    publisher = wt.CollectivePublisher(receivers=1, timeout_s=24 * 3600)
    weights = _weights(0)
    handle = publisher.publish(weights, 7)
    got = wt.receive(handle, 7, names=("scale",))
    assert list(got) == ["scale"] and torch.equal(got["scale"], weights["scale"])


def test_flatten_one_buffer_per_dtype_round_trip():
    weights = _weights(1)
    specs, buffers = wt.flatten(weights)
    assert [b.dtype for b in buffers] == [torch.bfloat16, torch.float32, torch.float64]
    back = wt.unflatten(specs, buffers)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_cuda_ipc_handle_encoding_round_trip():
    ipc = wt.IpcBuffer(dtype="bfloat16", numel=123, device=1, handle=b"\x01" * 64, storage_size=246,
                       storage_offset=0, ref_counter_handle=b"/torch_123", ref_counter_offset=4,
                       event_handle=b"\x02" * 64, event_sync_required=True)
    handle = wt.Handle(kind="cuda_ipc", location="cuda_ipc-abc",
                       specs=[wt.TensorSpec("w", "bfloat16", [3, 41], 0, 0)], buffers=[ipc], version_tag=ipc)
    message = decode(encode(PolicyWeights(version=4, handle=wt.as_message(handle))))
    assert message.version == 4
    assert message.handle.kind == "cuda_ipc" and message.handle.location == "cuda_ipc-abc"
    assert message.handle.buffers[0].handle == ipc.handle and message.handle.buffers[0].event_handle == ipc.event_handle
    assert message.handle.buffers[0].numel == 123 and message.handle.specs[0].shape == [3, 41]
    assert message.handle.version_tag.handle == ipc.handle
    if not torch.cuda.is_available():
        with pytest.raises(wt.WeightsTransferError, match="needs CUDA"):
            wt.receive(message.handle, 4)
        with pytest.raises(wt.WeightsTransferError, match="needs CUDA"):
            wt.CudaIpcPublisher()


def test_module_imports_neither_zmq_nor_msgspec():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('wt', {str(ROOT / 'respec/runtime/weights_transfer.py')!r})\n"
            "module = sys.modules['wt'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "assert 'zmq' not in sys.modules and 'msgspec' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(("setting", "same_process", "cuda", "expected"), [
    ("auto", True, True, "local"), ("auto", False, True, "cuda_ipc"), ("auto", False, False, "file"),
    ("file", True, True, "file"), ("collective", False, False, "collective"),
])
def test_choose_kind(setting, same_process, cuda, expected):
    assert wt.choose_kind(setting, same_process=same_process, same_host=True, publisher_cuda=cuda,
                          receivers_cuda=cuda) == expected


def test_auto_is_file_across_hosts():
    assert wt.choose_kind("auto", same_process=False, same_host=False, publisher_cuda=True,
                          receivers_cuda=True) == "file"


def _config(**run):
    return {"run": {"name": "w", **run}, "actors": {"a": {"class": "x.Y"}}}


def test_run_weights_config_validation():
    assert parse_config(_config()).run.weights == "auto"
    assert parse_config(_config(weights="collective")).run.weights == "collective"
    with pytest.raises(ConfigError, match="run.weights"):
        parse_config(_config(weights="nccl-please"))
    with pytest.raises(ConfigError, match=r"run.weights: cuda_ipc needs model.device cuda"):
        parse_config(_config(weights="cuda_ipc"))
    with pytest.raises(ConfigError, match=r"run.weights: cuda_ipc .* one host"):
        parse_config({**_config(weights="cuda_ipc", placement="ray", transport="tcp"), "model": {"device": "cuda"}})
    assert parse_config({**_config(weights="cuda_ipc"), "model": {"device": "cuda:0"}}).run.weights == "cuda_ipc"


def _ipc_receiver(inbox, outbox) -> None:
    from respec.runtime import weights_transfer

    def decode_message(frames):
        return codec.decode(frames)[1]

    torch.cuda.set_device(torch.cuda.device_count() - 1)
    while (data := inbox.get()) is not None:
        message = decode_message(data)
        target = {}
        try:
            with weights_transfer.opened(message.handle, message.version) as tensors:
                for name, tensor in tensors.items():
                    target[name] = torch.empty_like(tensor, device="cuda").copy_(tensor)  # into "the model"
        except weights_transfer.SupersededWeights:
            outbox.put((message.version, "superseded"))
            continue
        outbox.put((message.version, {k: _bits(t.cpu()) for k, t in target.items()}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda_ipc needs CUDA")
def test_cuda_ipc_two_processes_bit_identical(spawnable):
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=_ipc_receiver, args=(inbox, outbox), daemon=True)
    process.start()
    publisher = wt.CudaIpcPublisher(keep=2)
    try:
        for version in (1, 2, 3):
            weights = {k: v.cuda() for k, v in _weights(version).items()}
            inbox.put(encode(PolicyWeights(version=version, handle=wt.as_message(publisher.publish(weights, version)))))
            got_version, got = outbox.get(timeout=120)
            assert got_version == version
            for name, tensor in weights.items():
                assert np.array_equal(got[name], _bits(tensor.cpu())), name
        assert sorted(publisher.versions) == [2, 3]  # keeps the last `keep`
        # A receiver `keep` versions behind: v4 and v5 go into v2's and v3's buffers before it
        # reads v3's announcement, so it skips v3 (nothing copied) and gets v5 intact.
        late = encode(PolicyWeights(version=3, handle=wt.as_message(publisher.publish(
            {k: v.cuda() for k, v in _weights(3).items()}, 3))))
        for version in (4, 5):
            latest = {k: v.cuda() for k, v in _weights(version).items()}
            announcement = encode(PolicyWeights(version=version, handle=wt.as_message(publisher.publish(latest,
                                                                                                      version))))
        inbox.put(late)
        assert outbox.get(timeout=120) == (3, "superseded")
        inbox.put(announcement)
        got_version, got = outbox.get(timeout=120)
        assert got_version == 5 and all(np.array_equal(got[k], _bits(t.cpu())) for k, t in latest.items())
    finally:
        inbox.put(None)
        process.join(timeout=60)
    assert process.exitcode == 0


@pytest.fixture
def ipc_on_the_cpu(monkeypatch):
    """CudaIpcPublisher and receive with CUDA's parts stubbed: `_share` hands out an id,
    `_open_ipc` maps it back to the tensor, and the publisher is "in another process" (its
    in-process shortcut cleared after each publish)."""
    shared: dict[bytes, torch.Tensor] = {}

    def share(flat):
        key = str(len(shared)).encode()
        shared[key] = flat
        return wt.IpcBuffer(str(flat.dtype).removeprefix("torch."), flat.numel(), 0, key, 0, 0, b"", 0, None, False)

    monkeypatch.setattr(wt, "_require_cuda", lambda kind: None)
    monkeypatch.setattr(wt, "_check_on_cuda", lambda tensors: None)
    monkeypatch.setattr(wt, "_synchronize", lambda device=None: None)
    monkeypatch.setattr(wt, "_share", share)
    monkeypatch.setattr(wt, "_open_ipc", lambda buffer: shared[buffer.handle])
    publisher = wt.CudaIpcPublisher(keep=2)
    original = publisher.publish

    def publish(tensors, version):
        handle = original(tensors, version)
        wt._LOCAL.pop(publisher.location)
        return handle

    publisher.publish = publish
    return publisher


def test_cuda_ipc_receiver_keep_versions_behind_skips_the_version(ipc_on_the_cpu):
    handles = {version: ipc_on_the_cpu.publish(_weights(version), version) for version in (1, 2, 3)}
    with pytest.raises(wt.SupersededWeights, match=r"v1: the publisher has written v3"):
        wt.receive(handles[1], 1)
    for version in (2, 3):  # the last `keep` are intact
        with wt.opened(handles[version], version) as tensors:
            assert all(torch.equal(tensors[k], t) for k, t in _weights(version).items())


def test_cuda_ipc_version_written_over_during_the_copy_is_torn(ipc_on_the_cpu):
    handles = {version: ipc_on_the_cpu.publish(_weights(version), version) for version in (1, 2)}
    with pytest.raises(wt.TornWeights, match="may mix two versions") as caught:  # noqa: PT012
        with wt.opened(handles[2], 2):
            for version in (3, 4):  # v4 goes into v2's buffers
                ipc_on_the_cpu.publish(_weights(version), version)
    assert not isinstance(caught.value, wt.SupersededWeights)


def test_cuda_ipc_in_the_publishers_process_an_older_version_is_superseded(ipc_on_the_cpu):
    publisher = wt.CudaIpcPublisher(keep=2)  # the unpatched publish keeps the in-process shortcut
    first = publisher.publish(_weights(1), 1)
    publisher.publish(_weights(2), 2)
    with pytest.raises(wt.SupersededWeights, match="published v2 since"):
        wt.receive(first, 1)


def test_flatten_reuses_buffers_of_the_same_layout_and_makes_new_ones_for_another():
    """A cuda_ipc publisher writes each version into one of `keep` buffer sets made once
    (CudaIpcPublisher.ring): a set shared over IPC is never handed back to the allocator."""
    first = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.int64), "c": torch.full((2,), 7.0)}
    specs, buffers = wt.flatten(first)
    second = {name: tensor * 2 for name, tensor in first.items()}
    again_specs, again = wt.flatten(second, into=buffers)
    assert all(x is y for x, y in zip(again, buffers, strict=True)) and again_specs == specs
    assert all(torch.equal(wt.unflatten(again_specs, again)[name], second[name]) for name in second)
    _, other = wt.flatten({"a": torch.zeros(5)}, into=buffers)  # another layout: new buffers
    assert other[0] is not buffers[0] and other[0].numel() == 5


def test_the_prompt_source_does_not_decide_how_weights_travel():
    """It handles PolicyWeights for the version alone: a trainer on CUDA whose only weight
    loader is a CUDA generator picks cuda_ipc, not files (which cost 1-2 s an update on an
    H100 while the CPU-side PromptSource counted as a receiver)."""
    from respec.runtime.plan import build_plan

    config = parse_config({"run": {"name": "w"}, "model": {"device": "cpu"}, "actors": {
        "prompts": {"class": "respec.actors.prompt_source.PromptSource", "params": {"tokenizer_path": "t"}},
        "generator": {"class": "respec.actors.fast_rollouts.FastRollouts", "group": "gen",
                      "params": {"model_path": "m", "device": "cuda"}},
        "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "params": {"tokenizer_path": "t"}},
        "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer", "group": "train",
                    "params": {"model_path": "m", "device": "cuda"}}}})
    plan = build_plan(config)
    assert weights_route.loaders_on_cuda(plan, PolicyWeights)
    assert weights_route.loaders(plan, PolicyWeights) == ["generator"]  # also whom a collective broadcast waits for
    assert weights_route.kind(plan, PolicyWeights, "train", torch.device("cuda", 0)) == "cuda_ipc"


def test_the_trainer_puts_cuda_ipc_buffers_on_its_receivers_gpu_when_it_is_another():
    """A receiver reading buffers on the trainer's GPU runs its copies there, behind the
    trainer's next update (CudaIpcPublisher): with every loader on one other GPU the
    buffers go there; on the trainer's own GPU (or off the GPU) they stay with the trainer.
    A loader on the trainer's own GPU (a distiller beside it) does not count."""
    from respec.runtime.plan import build_plan

    def receivers_gpu(generator_devices: list[str], trainer_device: str, distiller_device: str = ""):
        generators = {f"generator{i}": {"class": "respec.actors.fast_rollouts.FastRollouts", "group": f"gen{i}",
                                        "params": {"model_path": "m", "device": device}}
                      for i, device in enumerate(generator_devices)}
        if distiller_device:
            generators["distiller"] = {"class": "respec.actors.draft_distiller.DraftDistiller", "group": "distil",
                                       "params": {"model_path": "m", "device": distiller_device}}
        config = parse_config({"run": {"name": "w"}, "model": {"device": "cpu"}, "actors": {
            "prompts": {"class": "respec.actors.prompt_source.PromptSource", "params": {"tokenizer_path": "t"}},
            **generators,
            "scorer": {"class": "respec.actors.reward_scorer.RewardScorer", "params": {"tokenizer_path": "t"}},
            "trainer": {"class": "respec.actors.policy_trainer.PolicyTrainer", "group": "train",
                        "params": {"model_path": "m", "device": trainer_device}}}})
        return weights_route.receivers_gpu(build_plan(config), PolicyWeights, torch.device(trainer_device))

    assert receivers_gpu(["cuda"], "cuda:1") == torch.device("cuda", 0)
    assert receivers_gpu(["cuda:1"], "cuda:0") == torch.device("cuda", 1)
    assert receivers_gpu(["cuda"], "cuda:0") is None  # the trainer's own GPU
    # a distiller beside the trainer reads across; the generator's GPU still gets the buffers
    assert receivers_gpu(["cuda"], "cuda:1", distiller_device="cuda:1") == torch.device("cuda", 0)
    assert receivers_gpu(["cuda"], "cuda:1", distiller_device="cuda:2") is None  # two other GPUs
    assert receivers_gpu(["cpu"], "cuda:1") is None


def test_flat_buffers_copied_across_are_one_copy_each_into_a_set_of_the_same_layout():
    specs, buffers = wt.flatten(_weights(1))
    across = wt.copied_to(buffers, torch.device("cpu"))
    assert all(a is not b and torch.equal(a, b) for a, b in zip(across, buffers, strict=True))
    _, buffers = wt.flatten(_weights(2), into=buffers)
    again = wt.copied_to(buffers, torch.device("cpu"), into=across)
    assert all(a is b for a, b in zip(again, across, strict=True))  # the shared set is reused, not remade
    assert all(torch.equal(wt.unflatten(specs, again)[k], t) for k, t in _weights(2).items())
    other = wt.copied_to(buffers[:1], torch.device("cpu"), into=across)  # another layout: a new set
    assert len(other) == 1 and other[0] is not across[0]


def _ipc_receiver_on(device_index, inbox, outbox) -> None:
    """Receives on `device_index` and reports where the mapped buffers live."""
    from respec.runtime import weights_transfer

    torch.cuda.set_device(device_index)
    while (data := inbox.get()) is not None:
        message = codec.decode(data)[1]
        with weights_transfer.opened(message.handle, message.version) as tensors:
            devices = sorted({t.device.index for t in tensors.values()})
            target = {name: torch.empty_like(t, device="cuda").copy_(t) for name, t in tensors.items()}
        outbox.put((message.version, devices, {k: _bits(t.cpu()) for k, t in target.items()}))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ipc_buffers_on_the_receivers_gpu_bit_identical(spawnable):
    """Weights on GPU 1, published into buffers on GPU 0 (the receiver's): the receiver
    maps GPU-0 memory and gets every version bit for bit, buffers reused included."""
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=_ipc_receiver_on, args=(0, inbox, outbox), daemon=True)
    process.start()
    publisher = wt.CudaIpcPublisher(keep=2, device="cuda:0")
    try:
        for version in (1, 2, 3, 4):  # 3 and 4 go into 1's and 2's buffers
            weights = {k: v.to("cuda:1") for k, v in _weights(version).items()}
            handle = publisher.publish(weights, version)
            assert {b.device for b in handle.buffers} == {0} and handle.version_tag.device == 0
            inbox.put(encode(PolicyWeights(version=version, handle=wt.as_message(handle))))
            got_version, devices, got = outbox.get(timeout=120)
            assert got_version == version and devices == [0]
            for name, tensor in weights.items():
                assert np.array_equal(got[name], _bits(tensor.cpu())), name
    finally:
        inbox.put(None)
        process.join(timeout=60)
