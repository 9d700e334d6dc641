"""Run playbooks on a private copy of inventory/local (the ``local_inventory`` fixture in
conftest.py makes it): for the tests that start the local cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ansible_run import ansible_playbook


def playbook(
    inv: Path, path: str, *args: str, rcs: tuple[int, ...] = (0,), timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run one playbook on ``inv``; fail the test unless its exit code is in ``rcs``."""
    return ansible_playbook(path, *args, inventory=inv, rcs=rcs, timeout=timeout)


def converge(inv: Path) -> str:
    return playbook(inv, "site.yml").stdout
