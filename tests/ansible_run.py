"""The one way tests run ``ansible-playbook``: :func:`ansible_playbook`.

Used by the unit tests that render a role, the playbook tests (tests/playbooks) and the lab
(molecule/default/tests, which puts this folder on ``sys.path``). It runs the venv's
``ansible-playbook`` from the repository root (so the project's ansible.cfg, roles and
filters apply unless ``env`` points ANSIBLE_CONFIG elsewhere), captures the output, and
fails the test with the output's tail unless the exit code is one of ``rcs``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


def playbook_argv(playbook: str | Path, *args: str, inventory: str | Path, extra: dict | None = None) -> list[str]:
    """The command line (for a test that runs it in the background with ``subprocess.Popen``)."""
    argv = [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(playbook), *args]
    return argv + (["-e", json.dumps(extra)] if extra else [])


def ansible_playbook(
    playbook: str | Path,
    *args: str,
    inventory: str | Path,
    extra: dict | None = None,
    rcs: Iterable[int] | None = (0,),
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``ansible-playbook -i INVENTORY PLAYBOOK ARGS [-e EXTRA]``; ``rcs=None`` accepts any exit
    code (the caller checks a failure it expects)."""
    proc = subprocess.run(
        playbook_argv(playbook, *args, inventory=inventory, extra=extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if rcs is not None:
        assert proc.returncode in tuple(rcs), f"rc={proc.returncode}\n" + proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc


def run_playbook(tmp_path: Path, text: str, inventory: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    """Write ``text`` as a playbook and run it against ``inventory``; fail the test if it fails."""
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(text)
    return ansible_playbook(playbook, inventory=inventory, extra=extra, timeout=120)


def changed(out: str) -> list[int]:
    """``changed=`` of every host in the last PLAY RECAP of ``out``."""
    return [int(n) for n in re.findall(r"changed=(\d+)", out.split("PLAY RECAP")[-1])]
