"""A bad inventory, or a host that cannot be reached, stops site.yml before any host changes.

A host can also go away later: the drop-before-* cases stop mjc-node2's sshd (the test-only
callback plugins/callback/mjc_drop_host.py) just as a node-changing play starts; its
cluster_gate must stop every host, naming mjc-node2, before the play's first change.

Each case runs site.yml against the lab with an extra inventory file on top of Molecule's,
and a new install prefix (-e cluster_install_prefix=...) so that a run that got past the
guards would have work to do on every reachable host: create the prefix, rewrite the
unit, restart the ranks. The tests then check that nothing of the kind happened.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

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
    # mjc-node2 answers Readiness, then its sshd dies as a node-changing play starts.
    "drop-before-mac-hygiene": {
        "hosts": {},
        "drop": ("mjc-node2", "Mac hygiene"),
        "stops_in": "Mac hygiene",
        "says": "fatal: [mjc-node2]: UNREACHABLE",
    },
    "drop-before-provision": {
        "hosts": {},
        "drop": ("mjc-node2", "Provision"),
        "stops_in": "Provision",
        "says": "fatal: [mjc-node2]: UNREACHABLE",
    },
}
CALLBACKS = Path(__file__).parent / "plugins" / "callback"


def node_state(lab) -> dict[str, str]:
    """Per host: the rank's invocation (a restart changes it), its files, the guard prefix."""
    files = (
        f"~/.config/systemd/user/{UNIT}.service {lab.prefix}/etc/{UNIT}/hostfile.json {lab.prefix}/etc/hostfile.json"
    )
    command = (
        f"systemctl --user show -p InvocationID --value {UNIT}; sha256sum {files}; "
        f"if test -e {GUARD_PREFIX}; then echo {GUARD_PREFIX} exists; fi"
    )
    return {r.name: lab.host(r.name).check_output(command) for r in lab.ranks}


def netns_of(lab, name: str) -> str:
    state = json.loads((lab.ephemeral / "lab" / "lab.json").read_text())
    return next(h["netns"] for h in state["hosts"] if h["name"] == name)


def start_sshd_again(lab, name: str) -> None:
    """The host's sshd as its init started it, in all of the host's namespaces; wait until it answers."""
    netns = netns_of(lab, name)
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
    init = next(p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "mjc-lab-init")
    subprocess.run(
        [
            "nsenter",
            "-a",
            "-t",
            init,
            "/usr/sbin/sshd",
            "-f",
            "/run/mjc-lab/sshd_config",
            "-E",
            "/run/mjc-lab/sshd.log",
        ],
        check=True,
        timeout=30,
    )
    deadline = time.monotonic() + 60
    while lab.host(name).run("true").rc != 0:
        assert time.monotonic() < deadline, f"{name}'s sshd did not come back"
        time.sleep(1)


@pytest.fixture(scope="module", params=sorted(CASES))
def bad_run(request, lab, tmp_path_factory):
    case = CASES[request.param]
    override = tmp_path_factory.mktemp(request.param) / "override.yml"
    override.write_text(yaml.safe_dump({"all": {"children": {"mlx_cluster": {"hosts": case["hosts"]}}}}))
    before = node_state(lab)
    env = {}
    if "drop" in case:
        name, play = case["drop"]
        env = {
            "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS),
            "ANSIBLE_CALLBACKS_ENABLED": "mjc_drop_host",
            "MJC_DROP_NETNS": netns_of(lab, name),
            "MJC_DROP_BEFORE": play,
        }
    try:
        run = lab.ansible_playbook("-i", str(override), "-e", f"cluster_install_prefix={GUARD_PREFIX}", env=env)
    finally:
        if "drop" in case:
            start_sshd_again(lab, case["drop"][0])
    recap = {name: dict(kv.split("=") for kv in counts.split()) for name, counts in RECAP.findall(run.stdout)}
    plays = re.findall(r"^PLAY \[([^\]|]+)", run.stdout, re.M)
    return {
        "case": case,
        "run": run,
        "recap": recap,
        "plays": [p.strip() for p in plays],
        "before": before,
        "after": node_state(lab),
    }


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
