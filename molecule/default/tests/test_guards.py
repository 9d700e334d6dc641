"""A bad inventory, or a host that cannot be reached, stops site.yml before any host changes.

Each case runs site.yml against the lab with an extra inventory file on top of Molecule's,
and a new install prefix (-e cluster_install_prefix=...) so that a run that got past the
guards would have work to do on every reachable host: create the prefix, rewrite the
unit, restart the ranks. The tests then check that nothing of the kind happened.
"""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import UNIT

RANK_LOGS_ON_FAILURE = False  # the ranks are not what these tests are about

# A private path of each lab host (molecule/lab): creating it would be visible per host.
GUARD_PREFIX = "/var/lib/mlx-jaccl-cluster/guard-run"
RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.M)

CASES = {
    # mjc-node2 claims mjc-node1's rank: preflight must refuse the inventory.
    "duplicate-rank": {
        "hosts": {"mjc-node2": {"cluster_rank": 1}},
        "stops_in": "Preflight",
        "says": "cluster_rank: is 1, which mjc-node1 already has",
    },
    # mjc-node2's address answers nothing (no lab host there): readiness must stop the play.
    "unreachable-host": {
        "hosts": {"mjc-node2": {"ansible_host": "10.77.0.13"}},
        "stops_in": "Readiness",
        "says": "UNREACHABLE",
    },
}


def node_state(lab) -> dict[str, str]:
    """Per host: the rank's invocation (a restart changes it), its files, the guard prefix."""
    files = f"~/.config/systemd/user/{UNIT}.service {lab.prefix}/etc/{UNIT}/hostfile.json {lab.prefix}/etc/hostfile.json"
    command = (f"systemctl --user show -p InvocationID --value {UNIT}; sha256sum {files}; "
               f"if test -e {GUARD_PREFIX}; then echo {GUARD_PREFIX} exists; fi")
    return {r.name: lab.host(r.name).check_output(command) for r in lab.ranks}


@pytest.fixture(scope="module", params=sorted(CASES))
def bad_run(request, lab, tmp_path_factory):
    case = CASES[request.param]
    override = tmp_path_factory.mktemp(request.param) / "override.yml"
    override.write_text(yaml.safe_dump({"all": {"children": {"mlx_cluster": {"hosts": case["hosts"]}}}}))
    before = node_state(lab)
    run = lab.ansible_playbook("-i", str(override), "-e", f"cluster_install_prefix={GUARD_PREFIX}")
    recap = {name: dict(kv.split("=") for kv in counts.split()) for name, counts in RECAP.findall(run.stdout)}
    plays = re.findall(r"^PLAY \[([^\]|]+)", run.stdout, re.M)
    return {"case": case, "run": run, "recap": recap, "plays": [p.strip() for p in plays],
            "before": before, "after": node_state(lab)}


def output(bad_run) -> str:
    return bad_run["run"].stdout + bad_run["run"].stderr


def test_the_run_fails(bad_run):
    assert bad_run["run"].returncode != 0, output(bad_run)


def test_the_output_names_the_problem(bad_run):
    named = bad_run["case"]["says"] in output(bad_run)
    assert named, output(bad_run)


def test_the_run_stops_in_the_guarding_play(bad_run):
    assert bad_run["plays"][-1] == bad_run["case"]["stops_in"], output(bad_run)


def test_no_host_reports_a_change(bad_run):
    changed = {name: counts["changed"] for name, counts in bad_run["recap"].items()}
    assert changed and set(changed.values()) == {"0"}, output(bad_run)


def test_no_host_got_the_new_prefix_nor_a_restarted_rank(bad_run):
    assert bad_run["after"] == bad_run["before"], output(bad_run)
