"""playbooks/download.yml (make download): the model lands in the controller cache with its
manifest, the playbook says how to serve it, and no node is touched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ansible_run import ansible_playbook

from mlx_jaccl_cluster.models.tiny import build_tiny_model


def _download(tmp_path: Path, extra: dict) -> subprocess.CompletedProcess:
    extra = extra | {
        "cluster_install_prefix": str(tmp_path / "prefix"),
        "cluster_controller_cache": str(tmp_path / "cache"),
    }
    return ansible_playbook("playbooks/download.yml", inventory="inventory/local", extra=extra, rcs=None)


def test_a_model_is_fetched_on_the_controller_only(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", arch="llama")
    proc = _download(
        tmp_path,
        {"cluster_model_source": "local", "cluster_model_local_path": str(model), "cluster_model_name": "tiny"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    manifest = json.loads((model / "mjc-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    assert "To serve it" in out and "cluster_model_name: tiny" in out
    assert not (tmp_path / "prefix").exists()  # nothing on the nodes
    assert "TASK [python_env" not in out and "TASK [service" not in out


def test_a_bad_repo_setting_stops_in_preflight(tmp_path):
    proc = _download(tmp_path, {"cluster_model_source": "hf", "cluster_model_repo": "", "cluster_model_name": "x"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "cluster_model_repo" in out, out[-3000:]
    assert not (tmp_path / "cache").exists()
