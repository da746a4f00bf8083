"""The vLLM backend's tests run only where vLLM imports (`make test-vllm`, .venv-vllm);
`make test` in .venv, which has no vLLM (it pins an older transformers), skips them."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default takes more of a small machine
