"""The mac_hygiene role: what it reads from pmset and ifconfig, what it decides to change,
what it records for uninstall, and the LaunchDaemon and script it installs.

No Mac runs here. The captures under ``captures/macos/`` that this file adds are
reconstructed, not captured on a Mac: ``pmset_custom_macmini.txt`` (an M4 Pro Mac mini as
shipped: AC Power only; its setting names and column layout follow public ``pmset -g
custom`` output of Apple-silicon Mac minis and Studios, e.g. ``autorestartatconnect``),
``pmset_custom_macmini_hygiene.txt`` (the same after the role), ``pmset_custom_macbookpro.txt``
(a laptop: Battery and AC Power, no ``autorestart``), ``pmset_g_macmini.txt`` (plain ``pmset
-g``, with its ``(sleep prevented by ...)`` notes) and ``ifconfig_all_bridged.txt`` (a Mac
mini as shipped: en2, en3 and en4 in bridge0, members in PROMISC, only en4 cabled). The
readiness captures reused here are described in test_macos_parsers.py.

The LaunchDaemon plist and the script are rendered by the real role templates through a
throwaway playbook (as test_service_files.py does) and read back with plistlib and
``bash -n``; the script is also run against stub ``ifconfig`` / ``ipconfig`` that keep a
bridge's state, to show it touches only the ports it is given and is idempotent.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest
from ansible_run import ROOT, ansible_playbook, run_playbook

from mlx_jaccl_cluster.ops import mac_hygiene, macos

CAPTURES = Path(__file__).parent / "captures" / "macos"
WANTED = {"sleep": 0, "disksleep": 0, "autorestart": 1, "womp": 1}  # the role's default


def capture(name: str) -> str:
    return (CAPTURES / name).read_text()


def pmset(name: str) -> dict:
    return macos.parse_pmset(capture(name))


# --------------------------------------------------------------------------- reading pmset


def test_pmset_custom_on_a_mac_mini_has_one_power_source():
    settings = pmset("pmset_custom_macmini.txt")
    assert list(settings) == ["AC Power"]
    assert settings["AC Power"]["sleep"] == "1"
    assert settings["AC Power"]["displaysleep"] == "10"
    assert settings["AC Power"]["autorestartatconnect"] == "0"


def test_pmset_setting_names_may_hold_spaces():
    assert pmset("pmset_custom_macmini.txt")["AC Power"]["Sleep On Power Button"] == "1"


def test_pmset_values_may_be_paths():
    assert pmset("pmset_custom_macbookpro.txt")["AC Power"]["hibernatefile"] == "/var/vm/sleepimage"


def test_pmset_custom_on_a_laptop_has_battery_and_ac():
    settings = pmset("pmset_custom_macbookpro.txt")
    assert list(settings) == ["Battery Power", "AC Power"]
    assert (settings["Battery Power"]["displaysleep"], settings["AC Power"]["displaysleep"]) == ("2", "10")


def test_plain_pmset_g_drops_the_notes_after_a_value():
    settings = pmset("pmset_g_macmini.txt")
    assert settings["System-wide power settings"] == {}
    assert settings["Currently in use"]["sleep"] == "1"
    assert settings["Currently in use"]["displaysleep"] == "10"


def test_pmset_rejects_an_error_text():
    with pytest.raises(ValueError, match="command not found"):
        macos.parse_pmset("zsh: command not found: pmset\n")


def test_pmset_rejects_a_setting_before_any_section():
    with pytest.raises(ValueError, match="unexpected line"):
        macos.parse_pmset(" sleep 1\nAC Power:\n sleep 1\n")


# --------------------------------------------------------------------------- what differs


def test_a_mac_mini_as_shipped_needs_sleep_disksleep_and_autorestart():
    changes = mac_hygiene.pmset_changes(pmset("pmset_custom_macmini.txt"), WANTED)
    assert [(c["source"], c["flag"], c["name"], c["from"], c["to"]) for c in changes] == [
        ("AC Power", "-c", "sleep", "1", "0"),
        ("AC Power", "-c", "disksleep", "10", "0"),
        ("AC Power", "-c", "autorestart", "0", "1"),
    ]  # womp is already 1; displaysleep is not the role's


def test_nothing_differs_once_applied():
    assert mac_hygiene.pmset_changes(pmset("pmset_custom_macmini_hygiene.txt"), WANTED) == []


def test_values_compare_as_pmset_prints_them():
    current = {"AC Power": {"womp": "1", "sleep": "0"}}
    assert mac_hygiene.pmset_changes(current, {"womp": True, "sleep": "0"}) == []


def test_a_laptop_changes_every_power_source_it_lists():
    changes = mac_hygiene.pmset_changes(pmset("pmset_custom_macbookpro.txt"), WANTED)
    assert {(c["source"], c["name"]) for c in changes} == {
        ("Battery Power", "sleep"),
        ("Battery Power", "disksleep"),
        ("Battery Power", "womp"),
        ("AC Power", "sleep"),
        ("AC Power", "disksleep"),
    }


def test_a_setting_a_power_source_does_not_list_is_unsupported_not_changed():
    current = pmset("pmset_custom_macbookpro.txt")
    assert mac_hygiene.pmset_unsupported(current, WANTED) == ["AC Power: autorestart", "Battery Power: autorestart"]
    assert not any(c["name"] == "autorestart" for c in mac_hygiene.pmset_changes(current, WANTED))
    assert mac_hygiene.pmset_unsupported(pmset("pmset_custom_macmini.txt"), WANTED) == []


def test_changes_need_the_power_sources_of_pmset_g_custom():
    with pytest.raises(ValueError, match="pmset -g custom"):
        mac_hygiene.pmset_changes(pmset("pmset_g_macmini.txt"), WANTED)


@pytest.mark.parametrize("wanted", [{"Sleep On Power Button": 0}, {"sleep; reboot": 0}, {"sleep": "0 womp 1"}])
def test_names_and_values_pmset_does_not_take_are_refused(wanted):
    with pytest.raises(ValueError):
        mac_hygiene.pmset_changes(pmset("pmset_custom_macmini.txt"), wanted)


def test_one_pmset_command_per_power_source():
    changes = mac_hygiene.pmset_changes(pmset("pmset_custom_macbookpro.txt"), WANTED)
    assert mac_hygiene.pmset_argv(changes) == [
        ["pmset", "-c", "sleep", "0", "disksleep", "0"],
        ["pmset", "-b", "sleep", "0", "disksleep", "0", "womp", "1"],
    ]


def test_no_change_no_command():
    assert mac_hygiene.pmset_argv([]) == []


# --------------------------------------------------------------------------- record and restore


def test_the_record_keeps_the_value_before_the_first_change():
    first = mac_hygiene.pmset_changes(pmset("pmset_custom_macmini.txt"), WANTED)
    state = mac_hygiene.pmset_record(None, first)
    assert state == {
        "AC Power": {
            "sleep": {"before": "1", "set": "0"},
            "disksleep": {"before": "10", "set": "0"},
            "autorestart": {"before": "0", "set": "1"},
        }
    }
    # someone set sleep to 5 by hand; the next run sets it back to 0: "before" is still 1
    again = mac_hygiene.pmset_changes({"AC Power": {"sleep": "5", "womp": "0"}}, WANTED)
    state = json.loads(json.dumps(mac_hygiene.pmset_record(state, again)))  # as it goes through the state file
    assert state["AC Power"]["sleep"] == {"before": "1", "set": "0"}
    assert state["AC Power"]["womp"] == {"before": "0", "set": "1"}


def test_uninstall_puts_back_exactly_what_the_role_changed():
    state = mac_hygiene.pmset_record(None, mac_hygiene.pmset_changes(pmset("pmset_custom_macmini.txt"), WANTED))
    restore = mac_hygiene.pmset_restore(state, pmset("pmset_custom_macmini_hygiene.txt"))
    assert restore["left"] == []
    assert mac_hygiene.pmset_argv(restore["changes"]) == [
        ["pmset", "-c", "sleep", "1", "disksleep", "10", "autorestart", "0"]
    ]


def test_uninstall_leaves_a_setting_someone_changed_since():
    state = {"AC Power": {"sleep": {"before": "1", "set": "0"}, "disksleep": {"before": "10", "set": "0"}}}
    now = {"AC Power": {"sleep": "30", "disksleep": "0"}}
    restore = mac_hygiene.pmset_restore(state, now)
    assert [(c["name"], c["to"]) for c in restore["changes"]] == [("disksleep", "10")]
    assert restore["left"] == ["AC Power: sleep is 30 now, not the 0 this role set; left as it is (it was 1 before)"]


def test_uninstall_skips_what_is_already_back():
    state = {"AC Power": {"sleep": {"before": "1", "set": "0"}}}
    assert mac_hygiene.pmset_restore(state, {"AC Power": {"sleep": "1"}}) == {"changes": [], "left": []}


def test_uninstall_names_a_power_source_that_is_gone():
    state = {"UPS Power": {"sleep": {"before": "1", "set": "0"}}}
    restore = mac_hygiene.pmset_restore(state, pmset("pmset_custom_macmini.txt"))
    assert restore["changes"] == [] and "UPS Power: sleep is not listed" in restore["left"][0]


def test_uninstall_with_nothing_recorded_does_nothing():
    assert mac_hygiene.pmset_restore(None, pmset("pmset_custom_macmini.txt")) == {"changes": [], "left": []}


# --------------------------------------------------------------------------- Thunderbolt ports


def bridged() -> tuple[list[str], dict, dict]:
    """Bridge members, IPv4 and link status of the Mac mini as shipped."""
    text = capture("ifconfig_all_bridged.txt")
    return (
        macos.parse_ifconfig_bridge_members(capture("ifconfig_bridge0_members.txt")),
        macos.parse_ifconfig_ipv4_by_iface(text),
        macos.parse_ifconfig_status_by_iface(text),
    )


def test_rdma_devices_name_their_ports():
    assert macos.rdma_interfaces([None, "rdma_en4"]) == ["en4"]
    assert macos.rdma_interfaces([None, ["rdma_en3", "rdma_en5"], "rdma_en3"]) == ["en3", "en5"]
    assert macos.rdma_interfaces([]) == []


@pytest.mark.parametrize("row", [["en4"], ["rdma_en4; reboot"], ["rdma_bridge0"]])
def test_only_rdma_en_devices_name_ports(row):
    with pytest.raises(ValueError, match="rdma_en4"):
        macos.rdma_interfaces(row)


def test_link_status_per_interface():
    status = macos.parse_ifconfig_status_by_iface(capture("ifconfig_all_bridged.txt"))
    assert (status["en4"], status["en2"], status["en0"], status["gif0"]) == ("active", "inactive", "active", None)


def test_a_cabled_port_in_the_bridge_leaves_it_and_asks_for_an_ipv4():
    members, ipv4, status = bridged()
    assert mac_hygiene.thunderbolt_network_plan(["en4"], members, ipv4, status) == {
        "leave_bridge": ["en4"],
        "need_ipv4": ["en4"],
        "missing": [],
    }


def test_a_port_without_a_link_leaves_the_bridge_but_asks_for_nothing_yet():
    members, ipv4, status = bridged()
    assert mac_hygiene.thunderbolt_network_plan(["en2"], members, ipv4, status) == {
        "leave_bridge": ["en2"],
        "need_ipv4": [],
        "missing": [],
    }


def test_a_ready_port_needs_nothing():
    ipv4 = macos.parse_ifconfig_ipv4_by_iface(capture("ifconfig_all.txt"))
    assert mac_hygiene.thunderbolt_network_plan(["en4"], [], ipv4) == {
        "leave_bridge": [],
        "need_ipv4": [],
        "missing": [],
    }


def test_a_port_this_mac_lacks_is_missing():
    members, ipv4, status = bridged()
    assert mac_hygiene.thunderbolt_network_plan(["en4", "en7"], members, ipv4, status)["missing"] == ["en7"]


def test_the_plan_never_names_a_port_it_was_not_given():
    members, ipv4, status = bridged()
    plan = mac_hygiene.thunderbolt_network_plan(["en4"], members, ipv4, status)
    assert {p for names in plan.values() for p in names} <= {"en4"}


def test_the_record_is_each_port_before_the_first_change():
    members, ipv4, _ = bridged()
    state = mac_hygiene.thunderbolt_network_record(None, ["en4"], "bridge0", members, ipv4)
    assert state == {"bridge": "bridge0", "interfaces": {"en4": {"bridge_member": True, "ipv4": []}}}
    # later: en4 is out with an address, en2 is added to the inventory
    later = mac_hygiene.thunderbolt_network_record(
        state, ["en4", "en2"], "bridge0", ["en2", "en3"], {**ipv4, "en4": ["169.254.10.20"]}
    )
    assert later["interfaces"]["en4"] == {"bridge_member": True, "ipv4": []}
    assert later["interfaces"]["en2"] == {"bridge_member": True, "ipv4": []}


def test_uninstall_gives_back_the_address_and_rejoins_only_former_members():
    state = {
        "bridge": "bridge0",
        "interfaces": {
            "en4": {"bridge_member": True, "ipv4": []},
            "en5": {"bridge_member": False, "ipv4": []},
            "en6": {"bridge_member": False, "ipv4": ["10.0.0.6"]},
        },
    }
    now = {"en4": ["169.254.10.20"], "en5": ["169.254.3.4"], "en6": ["10.0.0.6"]}
    assert mac_hygiene.thunderbolt_network_restore(state, ["en2", "en3"], now) == {
        "release_ipv4": ["en4", "en5"],
        "rejoin_bridge": ["en4"],
        "left": [],
    }


def test_uninstall_leaves_ports_as_they_are_when_nothing_changed_them():
    state = {"bridge": "bridge0", "interfaces": {"en4": {"bridge_member": True, "ipv4": []}}}
    assert mac_hygiene.thunderbolt_network_restore(state, ["en2", "en4"], {"en4": []}) == {
        "release_ipv4": [],
        "rejoin_bridge": [],
        "left": [],
    }


def test_uninstall_says_when_the_bridge_is_gone():
    state = {"bridge": "bridge0", "interfaces": {"en4": {"bridge_member": True, "ipv4": []}}}
    restore = mac_hygiene.thunderbolt_network_restore(state, [], {"en4": []}, bridge_present=False)
    assert restore["rejoin_bridge"] == [] and "bridge0, which does not exist now" in restore["left"][0]


def test_the_round_trip_puts_the_mac_back_as_shipped():
    members, ipv4, status = bridged()
    state = mac_hygiene.thunderbolt_network_record(None, ["en4"], "bridge0", members, ipv4)
    plan = mac_hygiene.thunderbolt_network_plan(["en4"], members, ipv4, status)
    after_members = [m for m in members if m not in plan["leave_bridge"]]
    after_ipv4 = {**ipv4, **{p: ["169.254.10.20"] for p in plan["need_ipv4"]}}
    restore = mac_hygiene.thunderbolt_network_restore(state, after_members, after_ipv4)
    assert (restore["release_ipv4"], restore["rejoin_bridge"]) == (["en4"], ["en4"])


# --------------------------------------------------------------------------- the LaunchDaemon and its script

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  connection: local
  vars_files:
    - {root}/roles/mac_hygiene/defaults/main.yml
    - {root}/roles/mac_hygiene/vars/main.yml
  tasks:
    - name: Render the script
      ansible.builtin.template:
        src: "{root}/roles/mac_hygiene/templates/thunderbolt-network.sh.j2"
        dest: "{out}/thunderbolt-network.sh"
        mode: "0600"

    - name: Render the LaunchDaemon (the launchd template shared with the service role)
      ansible.builtin.template:
        src: "{root}/templates/launchd.plist.j2"
        dest: "{out}/thunderbolt-network.plist"
        mode: "0600"
      vars:
        launchd_job: "{{{{ __mac_hygiene_launchd_job }}}}"
"""


def render(tmp_path: Path, extra: dict) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    run_playbook(
        tmp_path,
        PLAYBOOK.format(root=ROOT, out=out),
        "localhost,",
        {"ansible_python_interpreter": sys.executable, **extra},
    )
    return out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Path:
    return render(
        tmp_path_factory.mktemp("daemon"),
        {
            "mac_hygiene_rdma_devices": [None, "rdma_en4", ["rdma_en3", "rdma_en5"]],
            "mac_hygiene_prefix": "/Users/admin/mlx-jaccl-cluster",
        },
    )


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_the_launchdaemon_runs_the_script_with_the_inventory_ports_at_boot(daemon):
    plist = plistlib.loads((daemon / "thunderbolt-network.plist").read_bytes())
    assert plist["Label"] == "io.github.mlx-jaccl-cluster.thunderbolt-network"
    assert plist["ProgramArguments"] == [
        "/bin/bash",
        "/Users/admin/mlx-jaccl-cluster/mac_hygiene/thunderbolt-network.sh",
        "bridge0",
        "en4",
        "en3",
        "en5",
    ]
    assert plist["RunAtLoad"] is True
    assert plist["StartInterval"] == 60
    assert "KeepAlive" not in plist, "a script that ends must not be restarted in a loop"
    assert (
        plist["StandardOutPath"]
        == plist["StandardErrorPath"]
        == "/Users/admin/mlx-jaccl-cluster/mac_hygiene/thunderbolt-network.log"
    )
    assert plist["EnvironmentVariables"]["PATH"].split(":") == ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_interval_zero_means_at_boot_only(tmp_path):
    out = render(
        tmp_path,
        {
            "mac_hygiene_rdma_devices": ["rdma_en4", None],
            "mac_hygiene_prefix": "/opt/mjc",
            "mac_hygiene_thunderbolt_network_interval": 0,
        },
    )
    plist = plistlib.loads((out / "thunderbolt-network.plist").read_bytes())
    assert "StartInterval" not in plist and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"][-2:] == ["bridge0", "en4"]


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_the_script_is_valid_bash(daemon):
    script = daemon / "thunderbolt-network.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().startswith("#!/bin/bash\n")


# Stub ifconfig / ipconfig: a bridge with members and per-port addresses and links, kept in
# files under $STUB, and every changing call logged in $STUB/calls.
IFCONFIG = r"""#!/bin/bash
s=$STUB
if [ "$1" = bridge0 ]; then
  [ -f "$s/members" ] || { echo "ifconfig: interface bridge0 does not exist" >&2; exit 1; }
  if [ $# -eq 3 ]; then
    echo "ifconfig $*" >> "$s/calls"
    case $2 in
      deletem) grep -vx "$3" "$s/members" > "$s/members.new"; mv "$s/members.new" "$s/members" ;;
      addm) echo "$3" >> "$s/members" ;;
    esac
    exit 0
  fi
  echo "bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500"
  while read -r m; do printf '\tmember: %s flags=3<LEARNING,DISCOVER>\n' "$m"; done < "$s/members"
  printf '\tstatus: active\n'
  exit 0
fi
[ -f "$s/link.$1" ] || { echo "ifconfig: interface $1 does not exist" >&2; exit 1; }
echo "$1: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500"
[ -f "$s/ipv4.$1" ] && printf '\tinet %s netmask 0xffff0000 broadcast 169.254.255.255\n' "$(cat "$s/ipv4.$1")"
printf '\tstatus: %s\n' "$(cat "$s/link.$1")"
"""
IPCONFIG = r"""#!/bin/bash
echo "ipconfig $*" >> "$STUB/calls"
case $3 in
  DHCP) echo 169.254.10.20 > "$STUB/ipv4.$2" ;;
  NONE) rm -f "$STUB/ipv4.$2" ;;
esac
"""


@pytest.fixture
def mac(tmp_path) -> dict:
    """A Mac mini as shipped: en2, en3, en4 in bridge0, only en4 cabled; en0 on the LAN."""
    stub, bin_dir = tmp_path / "state", tmp_path / "bin"
    stub.mkdir()
    bin_dir.mkdir()
    for name, text in (("ifconfig", IFCONFIG), ("ipconfig", IPCONFIG)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (stub / "members").write_text("en2\nen3\nen4\n")
    (stub / "calls").write_text("")
    for port, link in (("en0", "active"), ("en2", "inactive"), ("en3", "inactive"), ("en4", "active")):
        (stub / f"link.{port}").write_text(link)
    (stub / "ipv4.en0").write_text("192.168.1.15")
    return {"state": stub, "env": {**os.environ, "STUB": str(stub), "PATH": f"{bin_dir}:{os.environ['PATH']}"}}


def run_script(daemon: Path, mac: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(daemon / "thunderbolt-network.sh"), *args],
        env=mac["env"],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_the_script_frees_only_the_ports_it_is_given_and_is_idempotent(daemon, mac):
    first = run_script(daemon, mac, "bridge0", "en4")
    assert first.returncode == 0, first.stderr
    assert [line.split(" ", 2)[2] for line in first.stdout.splitlines()] == [
        "changed: en4 left bridge0",
        "changed: en4 asked for an IPv4 address (DHCP; self-assigned 169.254.x.y when no server answers)",
    ]
    assert (mac["state"] / "members").read_text().split() == ["en2", "en3"]
    assert (mac["state"] / "calls").read_text().splitlines() == [
        "ifconfig bridge0 deletem en4",
        "ipconfig set en4 DHCP",
    ]

    second = run_script(daemon, mac, "bridge0", "en4")
    assert (second.returncode, second.stdout) == (0, "")
    assert len((mac["state"] / "calls").read_text().splitlines()) == 2


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_the_script_asks_no_address_for_a_port_without_a_link(daemon, mac):
    proc = run_script(daemon, mac, "bridge0", "en2")
    assert proc.returncode == 0 and "changed: en2 left bridge0" in proc.stdout
    assert "DHCP" not in (mac["state"] / "calls").read_text()


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_the_script_fails_on_a_missing_or_odd_port_but_still_does_the_others(daemon, mac):
    proc = run_script(daemon, mac, "bridge0", "en7", "bridge0", "en4")
    assert proc.returncode == 1
    assert "en7 does not exist" in proc.stderr and "bridge0 is not a Thunderbolt network port" in proc.stderr
    assert (mac["state"] / "members").read_text().split() == ["en2", "en3"]


@pytest.mark.playbook  # renders the role with ansible-playbook
def test_the_script_works_without_a_bridge(daemon, mac):
    (mac["state"] / "members").unlink()
    proc = run_script(daemon, mac, "bridge0", "en4")
    assert proc.returncode == 0 and proc.stdout.count("changed:") == 1 and "asked for an IPv4" in proc.stdout


# --------------------------------------------------------------------------- the role, end to end, on a fake Mac
#
# The real role runs (connection local) against one stateful fake of pmset, ifconfig,
# ipconfig, launchctl and plutil put first on PATH: the state is one JSON file. launchctl
# bootstrap runs the daemon's ProgramArguments as launchd would for RunAtLoad. This checks
# the tasks' wiring (what is read, decided, recorded, changed, reported), not macOS itself.

FAKEMAC = r"""#!{python}
import json, os, plistlib, subprocess, sys
path = os.environ["FAKEMAC"]
with open(path) as f:
    st = json.load(f)
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]


def save():
    with open(path, "w") as f:
        json.dump(st, f, indent=1)


def called():
    st["calls"].append(" ".join([tool] + args))
    save()


if tool == "pmset":
    if args == ["-g", "custom"]:
        for source, settings in st["pmset"].items():
            print(source + ":")
            for name, value in settings.items():
                print(" %-20s %s" % (name, value))
        sys.exit(0)
    sources = {{"-a": list(st["pmset"]), "-c": ["AC Power"], "-b": ["Battery Power"], "-u": ["UPS Power"]}}[args[0]]
    for source in sources:
        for name, value in zip(args[1::2], args[2::2]):
            if name in st["pmset"].get(source, {{}}):
                st["pmset"][source][name] = value
    called()
elif tool == "ifconfig":
    def block(name):
        port = st["ports"][name]
        return "\n".join(["%s: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500" % name]
                         + ["\tinet %s netmask 0xffff0000 broadcast 169.254.255.255" % ip for ip in port["ipv4"]]
                         + ["\tstatus: %s" % port["link"]])

    def bridge():
        return "\n".join(["bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500"]
                         + ["\tmember: %s flags=3<LEARNING,DISCOVER>" % m for m in st["bridge"]] + ["\tstatus: active"])

    if not args:
        print("\n".join([block(p) for p in st["ports"]] + ([bridge()] if st["bridge"] is not None else [])))
    elif args[0] == "bridge0" and st["bridge"] is not None:
        if len(args) == 3:
            if args[1] == "deletem":
                st["bridge"].remove(args[2])
            else:
                st["bridge"].append(args[2])
            called()
        else:
            print(bridge())
    elif args[0] in st["ports"]:
        print(block(args[0]))
    else:
        sys.exit("ifconfig: interface %s does not exist" % args[0])
elif tool == "ipconfig":
    st["ports"][args[1]]["ipv4"] = ["169.254.10.20"] if args[2] == "DHCP" else []
    called()
elif tool == "launchctl":
    label = args[-1].split("/", 1)[1] if "/" in args[-1] and args[0] != "bootstrap" else None
    if args[0] == "print":
        sys.exit(0 if label in st["launchd"] else 113)
    called()
    if args[0] == "bootout":
        known = st["launchd"].pop(label, None)
        save()
        sys.exit(0 if known else 3)
    with open(args[2], "rb") as f:
        plist = plistlib.load(f)
    if plist["Label"] in st["launchd"]:
        sys.exit("Bootstrap failed: 5: Input/output error")
    st["launchd"][plist["Label"]] = args[2]
    save()
    if plist.get("RunAtLoad"):
        with open(plist["StandardOutPath"], "a") as log:
            subprocess.run(plist["ProgramArguments"], stdout=log, stderr=log)
elif tool == "plutil":
    with open(args[1], "rb") as f:
        plistlib.load(f)
    print(args[1] + ": OK")
"""

ROLE_PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  connection: local
  tasks:
    - name: The mac_hygiene role
      ansible.builtin.include_role:
        name: mac_hygiene
        tasks_from: "{{ entry }}"
"""


@pytest.fixture
def fake_mac(tmp_path) -> dict:
    """A Mac mini as shipped (reconstructed captures) behind fake tools; the role's paths in tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fakemac").write_text(FAKEMAC.format(python=sys.executable))
    (bin_dir / "fakemac").chmod(0o755)
    for tool in ("pmset", "ifconfig", "ipconfig", "launchctl", "plutil"):
        (bin_dir / tool).symlink_to(bin_dir / "fakemac")
    text = capture("ifconfig_all_bridged.txt")
    ipv4, status = macos.parse_ifconfig_ipv4_by_iface(text), macos.parse_ifconfig_status_by_iface(text)
    state = {
        "pmset": pmset("pmset_custom_macmini.txt"),
        "bridge": ["en2", "en3", "en4"],
        "launchd": {},
        "calls": [],
        "ports": {p: {"ipv4": ipv4[p], "link": status[p]} for p in ("en0", "en1", "en2", "en3", "en4")},
    }
    (tmp_path / "mac.json").write_text(json.dumps(state))
    (tmp_path / "LaunchDaemons").mkdir()
    (tmp_path / "play.yml").write_text(ROLE_PLAYBOOK)
    return {
        "tmp": tmp_path,
        "state": tmp_path / "mac.json",
        "initial": state,
        "env": {**os.environ, "FAKEMAC": str(tmp_path / "mac.json"), "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    }


def play(mac: dict, entry: str, *flags: str) -> int:
    """Run the role's ``entry`` on the fake Mac; the number of changed tasks."""
    extra = {
        "entry": entry,
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "mjc_node": {"system": "Darwin"},
        "mac_hygiene_rdma_devices": [None, "rdma_en4"],
        "mac_hygiene_prefix": str(mac["tmp"] / "prefix"),
        "mac_hygiene_power_enabled": True,
        "mac_hygiene_thunderbolt_network_enabled": True,
        "__mac_hygiene_group": "root",
        "__mac_hygiene_launchd_dir": str(mac["tmp"] / "LaunchDaemons"),
    }
    proc = ansible_playbook(
        mac["tmp"] / "play.yml", *flags, inventory="localhost,", extra=extra, env=mac["env"], timeout=180
    )
    recap = next(line for line in proc.stdout.splitlines() if line.startswith("localhost") and "changed=" in line)
    return int(recap.split("changed=")[1].split()[0])


@pytest.mark.playbook  # renders the role with ansible-playbook
@pytest.mark.slow
def test_the_role_applies_once_records_first_and_uninstall_puts_everything_back(fake_mac):
    mac, initial = fake_mac, fake_mac["initial"]
    read = lambda: json.loads(mac["state"].read_text())  # noqa: E731
    files = mac["tmp"] / "prefix" / "mac_hygiene"
    plist = mac["tmp"] / "LaunchDaemons" / "io.github.mlx-jaccl-cluster.thunderbolt-network.plist"

    play(mac, "main", "--check")
    assert read() == initial, "check mode changed the Mac"
    assert not files.exists() and not plist.exists()

    assert play(mac, "main") > 0
    now = read()
    assert now["pmset"]["AC Power"] == {
        **initial["pmset"]["AC Power"],
        "sleep": "0",
        "disksleep": "0",
        "autorestart": "1",
    }  # displaysleep kept
    assert now["bridge"] == ["en2", "en3"] and now["ports"]["en4"]["ipv4"] == ["169.254.10.20"]
    assert {p: now["ports"][p] for p in ("en0", "en1", "en2", "en3")} == {
        p: initial["ports"][p] for p in ("en0", "en1", "en2", "en3")
    }, "a port the inventory does not name changed"
    assert list(now["launchd"]) == ["io.github.mlx-jaccl-cluster.thunderbolt-network"] and plist.is_file()
    assert json.loads((files / "pmset.json").read_text())["AC Power"]["sleep"] == {"before": "1", "set": "0"}
    assert json.loads((files / "thunderbolt-network.json").read_text())["interfaces"] == {
        "en4": {"bridge_member": True, "ipv4": []}
    }
    assert now["calls"][:3] == [
        "pmset -c sleep 0 disksleep 0 autorestart 1",
        "ifconfig bridge0 deletem en4",
        "ipconfig set en4 DHCP",
    ]

    assert play(mac, "main") == 0, "a second run changed something"

    assert play(mac, "uninstall") > 0
    after = read()
    assert after["pmset"] == initial["pmset"]
    assert sorted(after["bridge"]) == ["en2", "en3", "en4"] and after["ports"] == initial["ports"]
    assert after["launchd"] == {} and not plist.exists() and not files.exists()
    assert play(mac, "uninstall") == 0
