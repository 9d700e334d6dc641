"""Run a throwaway playbook from the test's temp folder, with the project's ansible.cfg."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


def run_playbook(tmp_path: Path, text: str, inventory: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    """Write ``text`` as a playbook and run it against ``inventory``; fail the test if it fails."""
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(text)
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", inventory, str(playbook), "-e", json.dumps(extra or {})]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
