# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# GPU users: install your CUDA build of torch into .venv first (see README), then these targets
# keep it, because TORCH_SPEC is only installed when no torch is present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.carv3d-installed

.PHONY: install demo test test-slow test-gpu clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The Khronos glTF validator (npm) checks exported GLBs in the tests; skipped where npm is missing.
	if command -v npm >/dev/null 2>&1; then npm ci --silent --no-audit --no-fund; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/carv3d train --config configs/demo_cpu.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info
