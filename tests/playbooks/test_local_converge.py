"""`make up`'s path on a private copy of inventory/local: site.yml converges three local ranks
under supervisord serving SmolLM2, answers Paris, and a second run changes nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mlx_jaccl_cluster.launch import free_ports

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_inventory(tmp_path_factory):
    """inventory/local with its own prefix and ports, so it runs beside a `make up` cluster."""
    tmp = tmp_path_factory.mktemp("local")
    inv = tmp / "inventory"
    shutil.copytree(ROOT / "inventory" / "local", inv)
    hosts = yaml.safe_load((inv / "hosts.yml").read_text())
    api, control, *ring = free_ports(5)
    for i, host in enumerate(hosts["all"]["children"]["mlx_cluster"]["hosts"].values()):
        host["cluster_ring_port"] = ring[i]
        host["cluster_unit_name"] = f"mjc-test-rank{i}"
    (inv / "hosts.yml").write_text(yaml.safe_dump(hosts))
    group = yaml.safe_load((inv / "group_vars" / "mlx_cluster.yml").read_text())
    group |= {"cluster_install_prefix": str(tmp / "prefix"), "cluster_api_port": api, "cluster_control_port": control}
    (inv / "group_vars" / "mlx_cluster.yml").write_text(yaml.safe_dump(group))
    yield inv, tmp / "prefix", api
    ctl = tmp / "prefix" / "venv" / "bin" / "supervisorctl"
    if ctl.exists():
        subprocess.run([str(ctl), "-c", str(tmp / "prefix" / "etc" / "supervisord.conf"), "shutdown"], timeout=60)


def converge(inv: Path) -> str:
    proc = subprocess.run([str(PLAYBOOK), "-i", str(inv), "site.yml"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def changed(recap: str) -> list[int]:
    return [int(n) for n in re.findall(r"changed=(\d+)", recap.split("PLAY RECAP")[-1])]


def test_converges_serves_and_is_idempotent(local_inventory):
    inv, prefix, api = local_inventory
    first = converge(inv)
    assert "A: The capital of France is Paris." in first
    health = httpx.get(f"http://127.0.0.1:{api}/health").json()
    assert health["status"] == "ok" and health["ranks_up"] == 3 and health["world_size"] == 3
    assert (prefix / "etc" / "hostfile.json").is_file()
    assert sorted(p.name for p in (prefix / "etc" / "supervisor").iterdir()) == [f"mjc-test-rank{i}.conf" for i in range(3)]

    second = converge(inv)
    assert changed(second) == [0, 0, 0], second.split("PLAY RECAP")[-1]
