"""One local Ray Serve instance for the serving tests: a tiny random policy with the built-in
character tokenizer, deployed twice on 2 CPUs: without a drafter (`/plain`) and with an
EAGLE head (`/eagle`, fixed shape s4_t1_n4 so every step drafts)."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafters.eagle import EagleHead
from respec.serve.build import ServeOptions
from tests.engine.conftest import build_hf_checkpoint
from tests.heads import greedy_distilled_head

MAX_LEN = 1024  # cache positions per row: room for the long generation a client walks away from
MAX_ROWS = 4
EOS = 2  # the character tokenizer's <eos>


def distilled_head(target, steps: int = 100) -> EagleHead:
    """A head distilled for ~1 s on the target's greedy continuations of random prompts: a
    random head is never accepted by a random target, and the tests must see acceptance."""
    generator = torch.Generator().manual_seed(99)
    prompts = [torch.cat([torch.tensor([1]), torch.randint(3, 87, (5,), generator=generator)]) for _ in range(32)]
    return greedy_distilled_head(target, prompts, max_new_tokens=32, steps=steps).eval()


@pytest.fixture(scope="session")
def served_dirs(tmp_path_factory):
    """(policy dir with the built-in character tokenizer, EAGLE head dir)."""
    from respec.engine.tokenizer import char_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    _, policy = build_hf_checkpoint(root / "policy", max_position_embeddings=MAX_LEN, eos_token_id=EOS,
                                    bos_token_id=1)
    char_tokenizer().save(policy)
    distilled_head(load_model(policy)).save(root / "eagle")
    torch.set_num_threads(threads)
    return policy, root / "eagle"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(served_dirs):
    """Base URL of the Serve HTTP proxy; apps at /plain and /eagle. Torn down at the end."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("fastapi", reason="the serve extra: pip install 'respec[serve]'")
    serve = pytest.importorskip("ray.serve")
    from respec.serve.deployment import start

    policy, eagle = served_dirs
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="respec-serve-tests")
    try:
        common = dict(max_rows=MAX_ROWS, max_len=MAX_LEN, num_cpus=0.5)
        # A port free now may be taken before Serve's proxy binds it (Ray's own processes
        # take ports as they start: CI lost a run to that), so a failed bind tries another.
        for attempt in range(3):
            port = _free_port()
            try:
                start(ServeOptions(str(policy), **common), "127.0.0.1", port, "/plain", "plain")
                break
            except Exception as error:  # ray.exceptions.RayTaskError from the proxy actor
                if "bind" not in str(error) or attempt == 2:
                    raise
                serve.shutdown()
        start(ServeOptions(str(policy), str(eagle), shape="s4_t1_n4", **common), "127.0.0.1", port, "/eagle", "eagle")
        print(f"serve up in {time.perf_counter() - started:.1f}s")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
