"""Run playbooks on a private copy of inventory/local (the ``local_inventory`` fixture in
conftest.py makes it): for the tests that start the local cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


def playbook(
    inv: Path, path: str, *args: str, rcs: tuple[int, ...] = (0,), timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run one playbook on ``inv``; fail the test unless its exit code is in ``rcs``."""
    proc = subprocess.run(
        [str(PLAYBOOK), "-i", str(inv), path, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode in rcs, f"rc={proc.returncode}\n" + proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc


def converge(inv: Path) -> str:
    return playbook(inv, "site.yml").stdout


def changed(recap: str) -> list[int]:
    return [int(n) for n in re.findall(r"changed=(\d+)", recap.split("PLAY RECAP")[-1])]
