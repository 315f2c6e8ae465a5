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

.PHONY: install install-dev demo test test-slow test-gpu test-blender clean

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

# Exported meshes opened in Blender itself (bpy). bpy 5 needs Python 3.11 and numpy < 2, so it lives in
# its own environment (~1 GB; the spec is setup.cfg's [blender] extra); the tests find it there.
BLENDER_VENV ?= .venv-blender
BLENDER_PYTHON ?= python3.11
BPY_SPEC ?= bpy>=5.0,<6
$(BLENDER_VENV)/.bpy-installed:
	test -x $(BLENDER_VENV)/bin/python || $(BLENDER_PYTHON) -m venv $(BLENDER_VENV)
	$(BLENDER_VENV)/bin/python -m pip install -q "$(BPY_SPEC)"
	touch $@

test-blender: $(DEV_STAMP) $(BLENDER_VENV)/.bpy-installed
	CARV3D_BLENDER_PYTHON=$(BLENDER_VENV)/bin/python $(PY) -m pytest -q -m slow tests/test_export_blender.py

clean:
	rm -rf $(VENV) $(BLENDER_VENV) build *.egg-info
