"""site.yml refuses a bad inventory in preflight, names host, field and fix, and touches nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")

CASES = [
    ("duplicate ranks", {"cluster_rank": 0}, ["rank1: cluster_rank", "which rank0 already has", "own cluster_rank"]),
    ("unknown backend", {"cluster_backend": "carrier-pigeon"}, ["cluster_backend", "jaccl", "ring"]),
    ("port collision", {"cluster_api_port": 32400}, ["cluster_api_port", "cluster_control_port"]),
    ("hf without a repo", {"cluster_model_source": "hf"}, ["cluster_model_repo"]),
]


@pytest.mark.parametrize("name,extra,words", CASES, ids=[c[0] for c in CASES])
def test_bad_inventory_stops_in_preflight_with_nothing_changed(tmp_path, name, extra, words):
    prefix = tmp_path / "prefix"
    extra = extra | {"cluster_install_prefix": str(prefix), "cluster_controller_cache": str(tmp_path / "cache")}
    proc = subprocess.run([str(PLAYBOOK), "-i", "inventory/local", "site.yml", "-e", json.dumps(extra)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Preflight | validate every host and group setting" in out
    assert "problem(s); nothing was changed" in out
    for word in words:
        assert word in out, f"{word!r} missing from:\n{out[-3000:]}"
    assert "TASK [node_readiness" not in out and "TASK [python_env" not in out
    assert not prefix.exists()
    assert not (tmp_path / "cache").exists()
