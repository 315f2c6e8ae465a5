# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# GPU users: install your CUDA build of torch into .venv first (see README), then these targets
# keep it, because TORCH_SPEC is only installed when no torch is present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# STAMP: the package, what `make demo` needs; DEV_STAMP: and the test tools (pytest, Ray, the
# glTF validator), what `make test` needs.
STAMP := $(VENV)/.carv3d-installed
DEV_STAMP := $(VENV)/.carv3d-dev-installed
# pip byte-compiles every file it installs: most of an install's time on a small machine, spent on
# thousands of torch/transformers modules carv3d never imports. The package installs without it,
# then scripts/compile_imports.py compiles what a run imports by importing it once.
PIP_NO_COMPILE := $(PY) -m pip install -q --no-compile

.PHONY: install install-dev demo test test-slow test-gpu clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP_NO_COMPILE) "$(TORCH_SPEC)"
	$(PIP_NO_COMPILE) -e .
	$(PY) scripts/compile_imports.py
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	# The Khronos glTF validator (npm) checks exported GLBs in the tests; skipped where npm is missing.
	if command -v npm >/dev/null 2>&1; then npm ci --silent --no-audit --no-fund; fi
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/carv3d train --config configs/demo_cpu.yaml

test: $(DEV_STAMP)
	$(PY) -m pytest -q

test-slow: $(DEV_STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(DEV_STAMP)
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info
