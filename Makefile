# mlx-jaccl-cluster — thin targets over the playbooks and the test suite.
# `make help` lists them. INVENTORY selects the inventory (default: inventory/local).

SHELL := /bin/bash
INVENTORY ?= inventory/local
VENV ?= .venv
PY := $(VENV)/bin/python
PLAYBOOK := $(VENV)/bin/ansible-playbook -i $(INVENTORY)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@command -v uv >/dev/null || python3 -m pip install -q uv
	@test -x $(PY) || uv venv -q --python python3 $(VENV)
	uv pip install -q --python $(PY) -e '.[controller,test]' 'mlx[cpu]==0.32.4'
	@touch $@

venv: $(VENV)/.installed ## create .venv with everything the controller and tests need

test: venv ## run every test (unit, runtime)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: venv ## unit tests only (seconds)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

.PHONY: help venv test test-fast
