# Two entry points, as the README says: `make run` and `make test`.
# A machine whose python3 already has torch (a GPU box) reuses it through
# --system-site-packages; elsewhere the CPU build of torch is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
RUN_CONFIG ?= configs/tiny.yaml
PREPARED ?= models/tiny

.PHONY: run demo test lint bench-runtime clean

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

lint: $(VENV)/.installed
	$(PY) -m ruff check respec tests bench

bench-runtime: $(VENV)/.installed
	$(PY) -m respec bench runtime --json runs/bench_runtime.json

clean:
	rm -rf $(VENV) runs models .pytest_cache
