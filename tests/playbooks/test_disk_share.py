"""Readiness's disk check counts what a node will hold: in a pipeline, its share of the model
(the plan's model_files), not the whole model. Two "machines" on this host (two install
prefixes); the second one's prefix is a small tmpfs (a small disk) that holds its share of a
four-file model but not the whole model: readiness passes. A tmpfs too small for its share is
refused before any node changes, naming the host, the GiB needed and free, and the fixes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from ansible_run import ansible_playbook

from mlx_jaccl_cluster.models.tiny import build_tiny_model, reshard
from mlx_jaccl_cluster.ops import manifest

pytestmark = pytest.mark.slow

MiB = 1 << 20
HEADROOM = 1 * MiB
# The first plays of site.yml: nothing after Readiness changes a node here.
READINESS = """
- name: Preflight
  hosts: mlx_cluster
  gather_facts: false
  roles: [preflight]
- name: Controller
  hosts: mlx_cluster
  gather_facts: false
  tasks:
    - name: Controller | model
      ansible.builtin.include_role: {name: model, tasks_from: controller}
- name: Readiness
  hosts: mlx_cluster
  gather_facts: false
  any_errors_fatal: true
  max_fail_percentage: 0
  roles: [cluster_gate, node_readiness]
"""


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount (root only): its size is the free space readiness sees."""
    mount = tmp_path / "small-disk"
    mount.mkdir()

    def sized(n_bytes: int):
        subprocess.run(["umount", str(mount)], capture_output=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={n_bytes}", "tmpfs", str(mount)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root only): {done.stderr.decode().strip()}")
        return shutil.disk_usage(mount).free

    yield mount, sized
    subprocess.run(["umount", str(mount)], capture_output=True)


def inventory(tmp_path, model, small_prefix):
    prefixes = [tmp_path / "machine0", small_prefix]
    hosts = {
        f"r{i}": {
            "cluster_rank": i,
            "cluster_ring_port": 32600 + i,
            "cluster_unit_name": f"u{i}",
            "cluster_install_prefix": str(prefix),
            "cluster_model_path": str(prefix / "models" / "tiny"),
            "cluster_layers": [4, 2][i],
        }
        for i, prefix in enumerate(prefixes)
    }
    group = {
        "ansible_connection": "local",
        "ansible_host": "127.0.0.1",
        "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "cluster_python": "{{ ansible_playbook_python }}",
        "cluster_ips": ["127.0.0.1"],
        "cluster_backend": "ring",
        "cluster_parallel": "pipeline",
        "cluster_model_source": "local",
        "cluster_model_local_path": str(model),
        "cluster_model_name": "tiny",
        "cluster_api_host": "127.0.0.1",
        "cluster_controller_cache": str(tmp_path / "cache"),
        "cluster_runtime_settings": {"max_context": 256, "max_batch": 1},
    }
    path = tmp_path / "hosts.yml"
    path.write_text(json.dumps({"all": {"children": {"mlx_cluster": {"hosts": hosts, "vars": group}}}}))
    return path


def readiness(tmp_path, inv):
    playbook = tmp_path / "readiness.yml"
    playbook.write_text(READINESS)
    proc = ansible_playbook(
        playbook, inventory=inv, extra={"node_readiness_disk_headroom": HEADROOM}, rcs=None, timeout=300
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_a_small_disk_that_holds_its_share_passes_and_one_that_cannot_is_named(tmp_path, small_disk):
    model = build_tiny_model(tmp_path / "tiny", arch="mistral")
    reshard(model, 4)  # rank 1 (layers 4-5) needs files 3 and 4: about half the weights
    whole = manifest.share_bytes(manifest.build(model))
    mount, sized = small_disk
    inv = inventory(tmp_path, model, mount / "prefix")

    free = sized(whole * 3 // 4)
    assert free < whole + HEADROOM  # the whole model would not fit here: counting it refused this disk
    rc, out = readiness(tmp_path, inv)
    assert rc == 0, out[-4000:]
    assert "rank 1 r1: layers 4..5" in out and "r1: receives 7 of the model''s files (layers 4-5)" in out, out[-4000:]

    sized(whole // 4)
    rc, out = readiness(tmp_path, inv)
    assert rc != 0, out[-4000:]
    assert f"r1: {mount} has " in out, out[-4000:]
    problem = out[out.index(f"r1: {mount} has ") :].splitlines()[0]  # the one-line [ERROR] form
    assert "MiB free but needs" in problem and "share 7 of 9 files (layers 4-5)" in problem, problem
    assert "short. Fixes: free" in problem and "fewer layers on this node (cluster_layers)" in problem, problem
    assert (
        "r0: "
        not in out.split("TASK [node_readiness : Readiness | room for this node's share")[1].split("PLAY RECAP")[0]
    )
    assert not (mount / "prefix").exists() and not (tmp_path / "machine0").exists()
