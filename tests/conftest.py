"""Fixtures every test folder may use."""

from __future__ import annotations

import os

# The fast path's Triton kernels run on the CPU under Triton's interpreter. Triton decides
# that when it is imported (transformers may import it while tests import checkpoints),
# so the choice is made here, before any test module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (then as it was): in-process reference engines and
    head training on 2 shared cores, where two threads of tiny matmuls wait on each other
    (37 s against 1 s seen for a head's training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
