# The two set-up commands (see README.md):
#   make serve   creates .venv, installs the server, starts it (MODEL=tiny by default)
#   make test    creates/uses .venv, installs the test extras, runs ruff and pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= $(or $(VLM_MODEL),tiny)
HOST ?= $(or $(VLM_HOST),127.0.0.1)
PORT ?= $(or $(VLM_PORT),8000)
ARGS ?=
PYTEST_ARGS ?=
# A random-weight tiny model's answers rarely end: capped, so a first request answers at once
# (unless ARGS or VLM_DEFAULT_MAX_TOKENS gives its own). The names server/engine/loader.py builds.
TINY_MODELS := tiny tiny-qwen2-vl tiny-qwen2.5-vl tiny-qwen3-vl tiny-qwen3-vl-thinking tiny-qwen3-vl-moe
TINY_ARGS := $(if $(and $(filter $(TINY_MODELS),$(MODEL)),$(if $(findstring default-max-tokens,$(ARGS))$(VLM_DEFAULT_MAX_TOKENS),,y)),--default-max-tokens 256)

.PHONY: install install-test serve test lint format readme-flags clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is needed ($(PYTHON) is $$($(PYTHON) -V 2>&1)): make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/vlm-server serve --model $(MODEL) --host $(HOST) --port $(PORT) $(TINY_ARGS) $(ARGS)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The README's flag table, from the same source as `vlm-server serve --help`.
readme-flags: install
	$(BIN)/python scripts/update_readme_flags.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
