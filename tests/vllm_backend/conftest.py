"""The vLLM backend's tests run only where vLLM imports (`make test-vllm`, .venv-vllm);
`make test` in .venv, which has no vLLM (it pins an older transformers), skips them: each
module starts with `pytest.importorskip("vllm")` (a conftest may not skip)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default takes more of a small machine
