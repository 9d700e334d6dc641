"""The service files the service role renders, checked the way each manager would read them.

launchd cannot run here: the plist is rendered by the real (shared) template from the
example 2-Mac inventory and validated with plistlib. The systemd unit goes through
`systemd-analyze verify`; the supervisord program through supervisor's own parser.
"""

from __future__ import annotations

import configparser
import plistlib
import shutil
import subprocess
from pathlib import Path
from xml.parsers.expat import ExpatError

import pytest
from ansible_run import ROOT, run_playbook

pytestmark = pytest.mark.playbook  # every file here is rendered by ansible-playbook

PLAYBOOK = """
- hosts: mlx_cluster
  gather_facts: false
  connection: local
  vars_files:
    - {root}/roles/service/defaults/main.yml
    - {root}/roles/service/vars/main.yml
  roles:
    - preflight
  tasks:
    - name: Render every service file of this rank
      ansible.builtin.template:
        src: "{root}/roles/service/templates/{{{{ item }}}}.j2"
        dest: "{out}/{{{{ inventory_hostname }}}}.{{{{ item }}}}"
        mode: "0600"
      loop: [rank.service, rank.supervisor.conf]
      delegate_to: localhost

    - name: Render its launchd agent (the template shared with mac_hygiene)
      ansible.builtin.template:
        src: "{root}/templates/launchd.plist.j2"
        dest: "{out}/{{{{ inventory_hostname }}}}.rank.plist"
        mode: "0600"
      vars:
        launchd_job: "{{{{ __service_launchd_job }}}}"
      delegate_to: localhost
"""


def render(tmp_path: Path, inventory: str, extra: dict | None = None) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    run_playbook(tmp_path, PLAYBOOK.format(root=ROOT, out=out), str(ROOT / "inventory" / inventory), extra)
    return out


@pytest.fixture(scope="module")
def mac_files(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("mac"), "example-2mac", {"cluster_api_key": "s3cret%x-0123456789abcdef"})


def test_launchd_plist_is_valid_and_keeps_the_rank_alive(mac_files):
    with open(mac_files / "mac2.rank.plist", "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "io.github.mlx-jaccl-cluster.mlx-jaccl-cluster"
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"][0].endswith("/venv/bin/mjc-rank")
    assert plist["StandardOutPath"] == plist["StandardErrorPath"]
    assert plist["StandardOutPath"].endswith("/logs/mlx-jaccl-cluster.log")


def test_launchd_environment_is_the_jaccl_contract(mac_files):
    env = plistlib.loads((mac_files / "mac2.rank.plist").read_bytes())["EnvironmentVariables"]
    assert env["MLX_RANK"] == "1"
    assert env["MJC_BACKEND"] == "jaccl"
    assert env["MLX_JACCL_COORDINATOR"] == "192.168.1.14:32323"
    assert env["MLX_IBV_DEVICES"].endswith("/etc/mlx-jaccl-cluster/ibv_devices.json")
    assert "MLX_HOSTFILE" not in env, "a stray hostfile would hijack a JACCL launch"
    assert env["MJC_API_KEY"] == "s3cret%x-0123456789abcdef"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_plistlib_rejects_a_broken_plist(mac_files, tmp_path):
    broken = tmp_path / "broken.plist"
    broken.write_bytes((mac_files / "mac1.rank.plist").read_bytes().replace(b"</dict>", b"", 1))
    with pytest.raises(ExpatError):  # what plistlib raises for malformed XML
        plistlib.loads(broken.read_bytes())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies_and_restarts_always(mac_files, tmp_path):
    unit = tmp_path / "mlx-jaccl-cluster-rank1.service"
    # verify needs the executable to exist: point ExecStart at a real one, keep the rest
    text = (mac_files / "mac2.rank.service").read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    unit.write_text(text.replace(exec_line, 'ExecStart="/bin/true"'))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Restart=always" in text
    assert 'Environment="MLX_RANK=1"' in text
    assert 'Environment="MJC_API_KEY=s3cret%%x-0123456789abcdef"' in text  # % escaped for systemd
    assert exec_line.startswith('ExecStart="/') and exec_line.endswith('/venv/bin/mjc-rank"')


def test_supervisor_program_parses_with_the_rank_environment(mac_files):
    from supervisor.datatypes import dict_of_key_value_pairs  # supervisor's own environment= reader

    parser = configparser.RawConfigParser()
    parser.read_string((mac_files / "mac1.rank.supervisor.conf").read_text())
    section = parser["program:mlx-jaccl-cluster"]
    assert section["autorestart"] == "true"
    assert section["command"].endswith("/venv/bin/mjc-rank")
    # supervisord expands %(...)s in values, so a literal % must arrive doubled
    env = {k: v % {} for k, v in dict_of_key_value_pairs(section["environment"]).items()}
    assert env["MLX_RANK"] == "0"
    assert env["MJC_API_KEY"] == "s3cret%x-0123456789abcdef"
    assert env["MLX_JACCL_COORDINATOR"] == "192.168.1.14:32323"
