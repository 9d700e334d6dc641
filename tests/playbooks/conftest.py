"""A private copy of inventory/local (own prefix, unit names and ports) and helpers to run
playbooks on it; used by the tests that start the local cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlx_jaccl_cluster.launch import free_ports

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")


def playbook(inv: Path, path: str, *args: str, rcs: tuple[int, ...] = (0,), timeout: float = 900) -> subprocess.CompletedProcess:
    """Run one playbook on ``inv``; fail the test unless its exit code is in ``rcs``."""
    proc = subprocess.run([str(PLAYBOOK), "-i", str(inv), path, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode in rcs, f"rc={proc.returncode}\n" + proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc


def converge(inv: Path) -> str:
    return playbook(inv, "site.yml").stdout


def changed(recap: str) -> list[int]:
    return [int(n) for n in re.findall(r"changed=(\d+)", recap.split("PLAY RECAP")[-1])]


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
