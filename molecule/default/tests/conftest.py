"""What the verify tests share: the lab inventory, rank 0's API, and rank logs on failure.

Molecule runs these files with testinfra over the scenario's inventory (the lab's hosts
plus the cluster settings of molecule.yml). By hand, once `molecule converge` has run:

    pytest molecule/default/tests --connection=ansible \
        --ansible-inventory=$MOLECULE_EPHEMERAL_DIRECTORY/inventory

Files run in name order: test_cluster (what a converged cluster looks like),
test_guards (bad runs change nothing), test_recovery (kills a rank, so it runs last).
A failing test prints the last lines of the rank logs it concerns.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra
from testinfra.utils.ansible_runner import AnsibleRunner

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))  # the tests' one ansible-playbook helper
from ansible_run import ansible_playbook  # noqa: E402

GROUP = "mlx_cluster"
UNIT = "mlx-jaccl-cluster"  # cluster_unit_name's default: one rank per lab host
LOG_LINES = 40
# Requests to the lab go straight to the bridge, never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Rank:
    name: str  # inventory hostname
    rank: int
    ip: str  # first of cluster_ips: its ring and control address


@dataclass(frozen=True, repr=False)
class Lab:
    inventory: str  # Molecule's inventory folder
    ephemeral: Path  # Molecule's ephemeral folder (lab state, model, ansible.cfg)
    ranks: list[Rank]  # in rank order
    settings: dict  # the group's cluster_* variables

    def __repr__(self) -> str:
        return f"Lab({self.inventory})"

    @property
    def prefix(self) -> str:
        return self.settings["cluster_install_prefix"]

    @property
    def api(self) -> str:
        return f"http://{self.ranks[0].ip}:{self.settings['cluster_api_port']}"

    @property
    def unit_log(self) -> str:
        return f"{self.prefix}/logs/{UNIT}.log"

    def host(self, name: str):
        return testinfra.get_host(f"ansible://{name}", ansible_inventory=self.inventory)

    def ansible_playbook(
        self, *args: str, timeout: int = 300, playbook: str = "site.yml", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """``playbook`` against this inventory (plus ``args``), with Molecule's ansible.cfg."""
        env = {
            "ANSIBLE_CONFIG": str(self.ephemeral / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "MOLECULE_EPHEMERAL_DIRECTORY": str(self.ephemeral),
            **(env or {}),
        }
        return ansible_playbook(playbook, *args, inventory=self.inventory, rcs=None, timeout=timeout, env=env)


@functools.cache
def load_lab(inventory: str) -> Lab:
    runner = AnsibleRunner(inventory)
    variables = {name: runner.get_variables(name) for name in runner.get_hosts(GROUP)}
    ranks = sorted(
        (Rank(name, v["cluster_rank"], v["cluster_ips"][0]) for name, v in variables.items()), key=lambda r: r.rank
    )
    settings = {
        key: value
        for key, value in variables[ranks[0].name].items()
        if key.startswith("cluster_") and key not in ("cluster_rank", "cluster_ips")
    }
    return Lab(inventory, Path(inventory).resolve().parent, ranks, settings)


def pytest_collection_modifyitems(config, items):
    """Without the lab's inventory, testinfra would fall back to ansible.cfg's (this machine)."""
    if not config.option.ansible_inventory:
        raise pytest.UsageError(
            "give --connection=ansible --ansible-inventory=<Molecule's ephemeral folder>/inventory "
            "(see molecule/default/tests/conftest.py)"
        )


@pytest.fixture(scope="session")
def lab(request) -> Lab:
    return load_lab(request.config.option.ansible_inventory)


@pytest.fixture
def me(lab, host) -> Rank:
    """The rank of the host under test."""
    return next(r for r in lab.ranks if r.name == host.backend.host)


def unit_property(host, prop: str) -> str:
    return host.check_output(f"systemctl --user show -p {prop} --value {UNIT}")


def unit_environment(host) -> dict[str, str]:
    """The environment systemd starts the rank with (as loaded, not as written)."""
    return dict(item.split("=", 1) for item in unit_property(host, "Environment").split())


def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST when ``body`` is given."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def chat(lab: Lab, content: str, max_tokens: int = 16) -> tuple[int, dict]:
    return http(
        f"{lab.api}/v1/chat/completions",
        {
            "model": lab.settings["cluster_model_name"],
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        },
        timeout=120,
    )


def wait_for(predicate, timeout: float, interval: float = 0.5):
    """``predicate()``'s first truthy value within ``timeout`` s, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, add the rank log of the host under test (of every rank otherwise).

    It goes in as captured stdout, so the JUnit report that tests/lab/test_molecule.py
    reads carries it too.
    """
    failed = (
        call.when in ("setup", "call")
        and call.excinfo is not None
        and not call.excinfo.errisinstance(pytest.skip.Exception)
    )
    inventory = item.config.option.ansible_inventory
    if failed and inventory and getattr(item.module, "RANK_LOGS_ON_FAILURE", True):
        lab = load_lab(inventory)
        host = item.funcargs.get("host")
        for name in [host.backend.host] if host is not None else [r.name for r in lab.ranks]:
            try:
                text = lab.host(name).run(f"tail -n {LOG_LINES} {lab.unit_log}").stdout
            except Exception as exc:  # the host may be the thing that failed
                text = f"(could not read it: {exc})\n"
            item.add_report_section(call.when, "stdout", f"--- {name}:{lab.unit_log} (last {LOG_LINES} lines)\n{text}")
    yield
