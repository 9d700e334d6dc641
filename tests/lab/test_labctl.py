"""The namespace lab of molecule/lab/labctl: real SSH hosts that Ansible can drive.

Runs as root on Linux. It uses its own lab name and subnet, so a lab brought up with
the defaults (for Molecule) can stay up while it runs.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABCTL = REPO / "molecule" / "lab" / "labctl"
LAB, SUBNET, HOSTS = "mjctest", "10.78.0.0/24", 3
NAMES = [f"mjc-node{i}" for i in range(HOSTS)]
IPS = [f"10.78.0.{10 + i}" for i in range(HOSTS)]
UNIT = "mjc-labprobe"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="builds namespaces: Linux and root only"),
]


def ansible_tool(name):
    """The Ansible command next to this Python (the project venv), else on PATH."""
    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else shutil.which(name) or name


def labctl(*args, check=True):
    proc = subprocess.run([sys.executable, str(LABCTL), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"labctl {args[0]} failed:\n{proc.stdout}{proc.stderr}"
    return proc


class Lab:
    def __init__(self, state_dir):
        self.dir = state_dir
        self.timings = {}

    def up(self):
        started = time.monotonic()
        labctl("up", "--state-dir", str(self.dir), "--hosts", str(HOSTS), "--lab", LAB, "--subnet", SUBNET)
        self.timings["up"] = time.monotonic() - started

    def ssh(self, rank, command, check=True):
        proc = subprocess.run(
            ["ssh", "-F", str(self.dir / "ssh_config"), NAMES[rank], command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert proc.returncode == 0, f"{NAMES[rank]}: `{command}` rc {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        return proc


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("lab"))
    lab.up()
    yield lab
    labctl("down", "--state-dir", str(lab.dir), check=False)
    print("\nlab timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in lab.timings.items()))


def test_each_host_has_its_own_hostname_and_ip(lab):
    for rank in range(HOSTS):
        out = lab.ssh(rank, "hostname; ip -4 -o addr show dev eth0").stdout
        hostname, addresses = out.split("\n", 1)
        assert hostname == NAMES[rank]
        assert f"inet {IPS[rank]}/24" in addresses
        assert not any(ip in addresses for ip in IPS if ip != IPS[rank])


@pytest.mark.parametrize("path", ["/opt/mlx-jaccl-cluster", "/var/lib/mlx-jaccl-cluster"])
def test_a_file_under_a_private_path_stays_on_its_host(lab, path):
    marker = f"{path}/marker-{uuid.uuid4().hex}"
    lab.ssh(0, f"echo node0 > {marker}")
    assert lab.ssh(0, f"cat {marker}").stdout == "node0\n"
    for rank in range(1, HOSTS):
        assert lab.ssh(rank, f"test -e {marker}", check=False).returncode == 1
    assert not os.path.exists(marker)  # nor on the controller


def test_systemctl_user_answers_on_each_host(lab):
    for rank in range(HOSTS):
        state = lab.ssh(rank, "systemctl --user is-system-running", check=False)
        assert state.stdout.strip() in ("running", "degraded"), state.stderr


def unit_props(lab, rank):
    out = lab.ssh(rank, f"systemctl --user show -p ActiveState,MainPID,InvocationID,TasksCurrent {UNIT}")
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def test_restarting_a_unit_on_one_host_leaves_the_same_unit_on_another(lab):
    """Hosts share one kernel: without a cgroup tree each, the hosts' managers would
    share one cgroup per unit name, count (and limit) each other's processes, and
    restarting the unit on node1 could kill node0's processes."""
    install = (
        f"mkdir -p ~/.config/systemd/user && printf '[Service]\\n"
        f"ExecStart=/bin/sleep 600\\n' > ~/.config/systemd/user/{UNIT}.service"
        f" && systemctl --user daemon-reload && systemctl --user start {UNIT}"
    )
    try:
        for rank in (0, 1):
            lab.ssh(rank, install)
        before0, before1 = unit_props(lab, 0), unit_props(lab, 1)
        assert before0["ActiveState"] == before1["ActiveState"] == "active"
        assert before0["TasksCurrent"] == before1["TasksCurrent"] == "1"

        lab.ssh(1, f"systemctl --user restart {UNIT}")
        time.sleep(1)  # time for node0's manager to notice a killed process

        after1 = unit_props(lab, 1)
        assert after1["InvocationID"] != before1["InvocationID"]  # it did restart
        after0 = unit_props(lab, 0)
        assert after0 == before0
        lab.ssh(0, f"kill -0 {after0['MainPID']}")
    finally:
        for rank in (0, 1):
            lab.ssh(rank, f"systemctl --user stop {UNIT}; rm -f ~/.config/systemd/user/{UNIT}.service", check=False)


def test_inventory_gives_each_host_its_rank_and_ip(lab):
    out = subprocess.run(
        [ansible_tool("ansible-inventory"), "--list", "-i", str(lab.dir / "inventory.yml")],
        capture_output=True,
        text=True,
        check=True,
        cwd=lab.dir,
    ).stdout
    inventory = json.loads(out)
    assert inventory["mlx_cluster"]["hosts"] == NAMES
    for rank, name in enumerate(NAMES):
        hostvars = inventory["_meta"]["hostvars"][name]
        assert hostvars["ansible_host"] == IPS[rank]
        assert hostvars["cluster_rank"] == rank
        assert hostvars["cluster_ips"] == [IPS[rank]]


def test_ansible_ping_reaches_every_host(lab):
    started = time.monotonic()
    proc = subprocess.run(
        [ansible_tool("ansible"), "mlx_cluster", "-m", "ansible.builtin.ping", "-i", str(lab.dir / "inventory.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=lab.dir,
    )
    lab.timings["ansible ping"] = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in NAMES:
        assert f"{name} | SUCCESS" in proc.stdout


def test_up_refuses_a_subnet_in_use(lab, tmp_path):
    proc = labctl("up", "--state-dir", str(tmp_path), "--lab", "mjcother", "--subnet", SUBNET, check=False)
    assert proc.returncode == 1
    assert f"subnet {SUBNET} is in use" in proc.stderr
    assert not os.path.exists(tmp_path / "inventory.yml")
    labctl("status", "--state-dir", str(lab.dir))  # the running lab is untouched


def test_up_after_a_crash_rebuilds_the_lab(lab):
    pids = subprocess.run(
        ["ip", "netns", "pids", f"{LAB}-node0"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert pids
    killed = 0
    for pid in pids:  # a short-lived process of the namespace may end between listing and killing
        try:
            os.kill(int(pid), 9)
            killed += 1
        except ProcessLookupError:
            pass
    assert killed, f"every process of {LAB}-node0 had ended before the kill: {pids}"
    status = labctl("status", "--state-dir", str(lab.dir), check=False)
    assert status.returncode == 1 and "ssh=FAIL" in status.stdout

    lab.up()
    assert lab.ssh(0, "hostname").stdout.strip() == NAMES[0]
    labctl("status", "--state-dir", str(lab.dir))


def alive(pid):
    """Running, not a zombie: this machine's PID 1 reaps orphans a few seconds late."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_down_leaves_no_namespace_link_process_or_cgroup(lab):
    state = json.loads((lab.dir / "lab.json").read_text())
    namespaces = [h["netns"] for h in state["hosts"]]
    netns_inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in namespaces}
    pids = {
        int(p)
        for ns in namespaces
        for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    }
    cgroups = [
        Path(m["mountpoint"] + m["cgroup"].rstrip("/")) / f"{LAB}-lab" for m in state["cgroup_mounts"] if "cgroup" in m
    ]
    assert pids and all(c.is_dir() for c in cgroups)

    started = time.monotonic()
    labctl("down", "--state-dir", str(lab.dir))
    lab.timings["down"] = time.monotonic() - started

    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in netns for ns in namespaces)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{LAB}-" not in links
    assert not [pid for pid in pids if alive(pid)]
    in_lab_netns = []
    for proc in Path("/proc").iterdir():
        try:
            if int(os.readlink(proc / "ns/net")[5:-1]) in netns_inodes:
                in_lab_netns.append(proc.name)
        except (OSError, ValueError):
            continue
    assert not in_lab_netns
    assert not [c for c in cgroups if c.exists()]
    assert list(lab.dir.iterdir()) == []

    again = labctl("down", "--state-dir", str(lab.dir))
    assert "nothing to take down" in again.stdout
