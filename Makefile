# Two entry points, as the README says: `make run` and `make test`.
# A machine whose python3 already has torch (a GPU box) reuses it through
# --system-site-packages; elsewhere the CPU build of torch is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
RUN_CONFIG ?= configs/demo.yaml

.PHONY: run test lint bench-runtime clean

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

run: $(VENV)/.installed
	$(PY) -m respec run $(RUN_CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check respec tests bench

bench-runtime: $(VENV)/.installed
	$(PY) -m respec bench runtime --json runs/bench_runtime.json

clean:
	rm -rf $(VENV) runs .pytest_cache
