"""A corrupted or truncated weight file on one node: `make status` and `make models-check`
name the node and the file, and the next site.yml (make up) repairs it from the controller copy.

Runs after test_guards and before test_operations (which starts from a serving cluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

RANK_LOGS_ON_FAILURE = True
WEIGHTS = "model.safetensors"
TRUNCATED, FLIPPED = "mjc-node1", "mjc-node2"  # one node each: a shorter file, a same-size bit flip


def weights(lab) -> str:
    return f"{lab.settings['cluster_model_path']}/{WEIGHTS}"


def sha(lab, name: str) -> str:
    return lab.host(name).check_output(f"sha256sum {weights(lab)}").split()[0]


def make(lab, target: str) -> subprocess.CompletedProcess:
    """A make target against the lab, with Molecule's ansible.cfg (ssh settings, roles path)."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(lab.ephemeral / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "MOLECULE_EPHEMERAL_DIRECTORY": str(lab.ephemeral),
    }
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            target,
            f"INVENTORY={lab.inventory}",
            f"VENV={Path(sys.executable).parent.parent}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def damaged(lab):
    good = sha(lab, lab.ranks[0].name)
    lab.host(TRUNCATED).check_output(f"truncate -s -4096 {weights(lab)}")
    # One byte inverted in place: same size, a new mtime (as any write leaves).
    lab.host(FLIPPED).check_output(
        f"python3 -c \"import sys; f = open(sys.argv[1], 'r+b'); f.seek(1000); b = f.read(1); f.seek(1000); "
        f'f.write(bytes([b[0] ^ 255])); f.close()" {weights(lab)}'
    )
    status = lab.ansible_playbook(playbook="playbooks/status.yml")
    check = make(lab, "models-check")
    repair = lab.ansible_playbook(timeout=600)
    after = lab.ansible_playbook(playbook="playbooks/status.yml")
    return {"good": good, "status": status, "check": check, "repair": repair, "after": after}


def out(proc) -> str:
    return proc.stdout + proc.stderr


def test_status_names_each_node_and_file(damaged):
    status = damaged["status"]
    assert status.returncode != 0, out(status)
    assert f"{TRUNCATED}: model not verified: {WEIGHTS}: " in status.stdout and "bytes, expected" in status.stdout, out(
        status
    )
    assert f"{FLIPPED}: model not verified: {WEIGHTS}: changed since it was last verified" in status.stdout, out(status)


def test_models_check_names_each_node_and_file(damaged):
    check = damaged["check"]
    assert check.returncode != 0, out(check)
    text = out(check)
    assert f"{TRUNCATED} | FAILED" in text and f"{WEIGHTS}: " in text and "bytes, expected" in text, text
    assert f"{FLIPPED} | FAILED" in text and f"{WEIGHTS}: sha256 differs" in text, text


def test_the_next_site_run_repairs_both_from_the_controller_copy(lab, damaged):
    assert damaged["repair"].returncode == 0, out(damaged["repair"])
    assert {sha(lab, name) for name in (TRUNCATED, FLIPPED)} == {damaged["good"]}
    assert damaged["after"].returncode == 0, out(damaged["after"])
