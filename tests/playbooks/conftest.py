"""``local_inventory``: a private copy of inventory/local (own prefix, unit names and ports),
so these tests run beside a `make up` cluster; supervisord is shut down afterwards."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from ansible_run import ROOT

from mlx_jaccl_cluster.launch import free_ports


@pytest.fixture(scope="module")
def local_inventory(tmp_path_factory, request):
    """inventory/local (or the module's ``INVENTORY``, e.g. "local-tensor") with its own
    prefix and ports, so it runs beside a `make up` cluster."""
    tmp = tmp_path_factory.mktemp("local")
    inv = tmp / "inventory"
    shutil.copytree(ROOT / "inventory" / getattr(request.module, "INVENTORY", "local"), inv)
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
