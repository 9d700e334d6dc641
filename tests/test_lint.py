"""ruff (lint and format), ansible-lint (production profile) and yamllint pass on the whole bundle."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_yamllint_is_clean():
    proc = run(str(BIN / "yamllint"), "--strict", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ansible_lint_production_profile_is_clean():
    proc = run(str(BIN / "ansible-lint"), "--profile", "production", "--nocolor", "site.yml", "playbooks", "roles")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]


def test_ruff_lint_is_clean():
    proc = run(str(BIN / "ruff"), "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]


def test_ruff_format_is_clean():
    proc = run(str(BIN / "ruff"), "format", "--check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
