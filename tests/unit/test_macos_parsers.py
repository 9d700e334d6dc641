"""macOS tool output is read right, and a node that cannot carry JACCL is told what to fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlx_jaccl_cluster.ops import mac_hygiene, macos

CAPTURES = Path(__file__).parent / "captures" / "macos"
PLUGIN = Path(__file__).parents[2] / "plugins" / "filter" / "macos_rdma.py"


def capture(name: str) -> str:
    """Text of one captured tool output."""
    return (CAPTURES / name).read_text()


def devinfo(name: str) -> dict:
    """A parsed ``ibv_devinfo`` capture."""
    return macos.parse_ibv_devinfo(capture(name))


def links(name: str, mapped: bool = True) -> list[dict]:
    """A parsed Thunderbolt capture, with ``enN`` names from the Mac mini's hardware ports when ``mapped``."""
    ports = macos.parse_hardware_ports(capture("networksetup_hardware_ports_macmini.txt")) if mapped else None
    return macos.parse_thunderbolt(capture(name), ports)


TB5 = "system_profiler_thunderbolt_macmini_m4pro_tb5.json"
TB4 = "system_profiler_thunderbolt_macmini_m4_tb4.json"


# --------------------------------------------------------------------------- ibv_devices


def test_ibv_devices_lists_names_and_guids():
    assert macos.parse_ibv_devices(capture("ibv_devices_two.txt")) == [
        {"name": "rdma_en2", "guid": "e0c5797d9c8fac05"},
        {"name": "rdma_en4", "guid": "e2c5797d9c8fac05"},
    ]


def test_ibv_devices_header_only_means_no_devices():
    assert macos.parse_ibv_devices(capture("ibv_devices_header_only.txt")) == []


def test_ibv_devices_no_ib_devices_found_means_no_devices():
    assert macos.parse_ibv_devices(capture("ibv_devices_no_devices.txt")) == []


def test_ibv_devices_rejects_an_error_text():
    with pytest.raises(ValueError, match="command not found"):
        macos.parse_ibv_devices("zsh: command not found: ibv_devices\n")


# --------------------------------------------------------------------------- ibv_devinfo


def test_ibv_devinfo_reads_an_active_port():
    port = devinfo("ibv_devinfo_one_active.txt")["rdma_en4"]["ports"][1]
    assert (port["state"], port["state_code"], port["active_mtu"], port["link_layer"]) == (
        "PORT_ACTIVE",
        4,
        4096,
        "Thunderbolt",
    )


def test_ibv_devinfo_reads_the_transport_without_its_code():
    assert devinfo("ibv_devinfo_one_active.txt")["rdma_en4"]["transport"] == "Thunderbolt"


def test_ibv_devinfo_reads_a_down_port():
    port = devinfo("ibv_devinfo_one_down.txt")["rdma_en4"]["ports"][1]
    assert (port["state"], port["state_code"]) == ("PORT_DOWN", 1)


def test_ibv_devinfo_reads_every_device_with_its_own_state():
    states = {name: dev["ports"][1]["state"] for name, dev in devinfo("ibv_devinfo_mixed.txt").items()}
    assert states == {"rdma_en2": "PORT_DOWN", "rdma_en3": "PORT_DOWN", "rdma_en4": "PORT_ACTIVE"}


def test_ibv_devinfo_with_no_devices_is_empty():
    assert devinfo("ibv_devinfo_none.txt") == {}


def test_ibv_devinfo_rejects_an_error_text():
    with pytest.raises(ValueError, match="no hca_id"):
        macos.parse_ibv_devinfo("Failed to get IB devices list: Operation not supported\n")


def test_ibv_devinfo_plain_output_has_no_speed_or_gids():
    port = devinfo("ibv_devinfo_one_active.txt")["rdma_en4"]["ports"][1]
    assert "active_speed" not in port and port["gids"] == []


def test_ibv_devinfo_verbose_reads_speed_and_width():
    port = devinfo("ibv_devinfo_v_ipv4.txt")["rdma_en4"]["ports"][1]
    assert (port["active_speed"], port["active_width"]) == ("10.0 Gbps", "8X")


def test_ibv_devinfo_verbose_reads_compressed_gids_in_order():
    assert devinfo("ibv_devinfo_v_ipv4.txt")["rdma_en4"]["ports"][1]["gids"] == [
        "fe80::344d:4ff:feea:4e44",
        "::ffff:169.254.12.34",
        "fe80::1021:1bac:fe1:b5e7",
    ]


def test_ibv_devinfo_verbose_reads_expanded_gids():
    assert (
        devinfo("ibv_devinfo_v_expanded_gids.txt")["rdma_en4"]["ports"][1]["gids"][2]
        == "0000:0000:0000:0000:0000:ffff:a9fe:0c22"
    )


def test_ibv_devinfo_drops_the_gid_type_suffix():
    text = "hca_id:\trxe0\n\t\tport:\t1\n\t\t\tGID[  1]:\t\t::ffff:10.0.0.1, RoCE v2\n"
    assert macos.parse_ibv_devinfo(text)["rxe0"]["ports"][1]["gids"] == ["::ffff:10.0.0.1"]


@pytest.mark.parametrize(
    "gid, ipv4",
    [
        ("::ffff:169.254.12.34", "169.254.12.34"),
        ("0000:0000:0000:0000:0000:ffff:a9fe:0c22", "169.254.12.34"),
        ("fe80::344d:4ff:feea:4e44", None),
        ("7f15:8861:c131:4d0d:83b6:ca50:ef76:c32b", None),
        ("not-a-gid", None),
    ],
)
def test_gid_ipv4_finds_the_mapped_address_in_either_form(gid, ipv4):
    assert macos.gid_ipv4(gid) == ipv4


def test_active_rdma_devices_lists_only_active_ones():
    assert macos.active_rdma_devices(devinfo("ibv_devinfo_mixed.txt")) == ["rdma_en4"]


# --------------------------------------------------------------------------- rdma_ctl, sw_vers


def test_rdma_ctl_enabled_is_true():
    assert macos.parse_rdma_ctl_status(capture("rdma_ctl_status_enabled.txt")) is True


def test_rdma_ctl_disabled_is_false():
    assert macos.parse_rdma_ctl_status(capture("rdma_ctl_status_disabled.txt")) is False


def test_rdma_ctl_tolerates_case_and_whitespace():
    assert macos.parse_rdma_ctl_status("  Enabled \n") is True


def test_rdma_ctl_unknown_output_raises_a_clear_error():
    with pytest.raises(ValueError, match="expected 'enabled' or 'disabled'"):
        macos.parse_rdma_ctl_status("zsh: command not found: rdma_ctl\n")


def test_sw_vers_reads_tahoe():
    assert macos.parse_sw_vers(capture("sw_vers_26_3.txt")) == (26, 3)


def test_sw_vers_reads_sequoia():
    assert macos.parse_sw_vers(capture("sw_vers_15_5.txt")) == (15, 5)


def test_sw_vers_reads_the_bare_product_version():
    assert macos.parse_sw_vers("26.2.1\n") == (26, 2, 1)


def test_sw_vers_without_a_version_raises():
    with pytest.raises(ValueError, match="ProductVersion"):
        macos.parse_sw_vers("ProductName:\tmacOS\n")


@pytest.mark.parametrize(
    "version, minimum, expected",
    [
        ((26, 3), (26, 2), True),
        ((26, 2), (26, 2), True),
        ((26, 1, 9), (26, 2), False),
        ((15, 5), (26, 2), False),
        ((26,), (26, 0), True),
        ("26.2", [26, 2], True),
    ],
)
def test_macos_at_least_compares_versions(version, minimum, expected):
    assert macos.macos_at_least(version, minimum) is expected


# --------------------------------------------------------------------------- Thunderbolt


def test_thunderbolt_lists_one_link_per_bus():
    assert [link["receptacle"] for link in links(TB5)] == [3, 2, 1]


def test_thunderbolt_reads_the_connected_tb5_link():
    link = links(TB5)[0]
    assert (link["connected"], link["speed_gbps"], link["speed_is_capability"], link["peer_is_mac"]) == (
        True,
        80.0,
        False,
        True,
    )


def test_thunderbolt_marks_idle_ports_as_capability():
    idle = links(TB5)[1]
    assert (idle["connected"], idle["speed_gbps"], idle["speed_is_capability"]) == (False, 120.0, True)


def test_thunderbolt_names_each_port_interface_from_hardware_ports():
    assert [link["interface"] for link in links(TB5)] == ["en4", "en3", "en2"]


def test_thunderbolt_without_hardware_ports_leaves_interface_unknown():
    assert {link["interface"] for link in links(TB5, mapped=False)} == {None}


def test_thunderbolt_reads_a_tb4_link_at_40():
    connected = [link for link in links(TB4) if link["connected"]]
    assert [(link["receptacle"], link["speed_gbps"]) for link in connected] == [(3, 40.0)]


def test_thunderbolt_accepts_decoded_json():
    assert macos.parse_thunderbolt(json.loads(capture(TB5))) == macos.parse_thunderbolt(capture(TB5))


def test_thunderbolt_rejects_text_that_is_not_json():
    with pytest.raises(ValueError, match="not JSON"):
        macos.parse_thunderbolt("Thunderbolt/USB4:\n\n    Thunderbolt/USB4 Bus 0:\n")


@pytest.mark.parametrize(
    "text, gbps",
    [
        ("80 Gb/s", 80.0),
        ("Up to 80 Gb/s", 80.0),
        ("Up to 120 Gb/s", 120.0),
        ("40 Gb/s", 40.0),
        ("Up to 10/20 Gb/s x1/x2", 20.0),
        ("", None),
        (None, None),
    ],
)
def test_link_speed_reads_gbps(text, gbps):
    assert macos.parse_link_speed(text) == gbps


def test_hardware_ports_map_port_names_to_devices():
    ports = macos.parse_hardware_ports(capture("networksetup_hardware_ports_macmini.txt"))
    assert (ports["Thunderbolt 3"], ports["Thunderbolt Bridge"], len(ports)) == ("en4", "bridge0", 6)


# --------------------------------------------------------------------------- ifconfig


def test_bridge_members_are_listed():
    assert macos.parse_ifconfig_bridge_members(capture("ifconfig_bridge0_members.txt")) == ["en2", "en3", "en4"]


def test_absent_bridge_has_no_members():
    assert macos.parse_ifconfig_bridge_members(capture("ifconfig_bridge0_absent.txt")) == []


def test_ifconfig_reads_a_link_local_ipv4():
    assert macos.parse_ifconfig_ipv4(capture("ifconfig_en4_linklocal.txt")) == ["169.254.12.34"]


def test_ifconfig_without_ipv4_ignores_inet6():
    assert macos.parse_ifconfig_ipv4(capture("ifconfig_en4_no_ipv4.txt")) == []


def test_ifconfig_all_gives_ipv4_per_interface():
    assert macos.parse_ifconfig_ipv4_by_iface(capture("ifconfig_all.txt")) == {
        "lo0": ["127.0.0.1"],
        "en0": ["192.168.1.14"],
        "en2": [],
        "en4": ["169.254.12.34"],
    }


# --------------------------------------------------------------------------- readiness


def check(wanted=("rdma_en4",), info="ibv_devinfo_v_ipv4.txt", enabled=True, members=(), tb=None, ipv4=None):
    """``check_node_rdma`` on captures; defaults describe a ready Mac mini."""
    return macos.check_node_rdma(list(wanted), devinfo(info), enabled, list(members), tb, ipv4)


def test_ready_node_has_no_problems():
    ipv4 = macos.parse_ifconfig_ipv4_by_iface(capture("ifconfig_all.txt"))
    assert check(tb=links(TB5), ipv4=ipv4) == []


def test_rdma_disabled_says_to_enable_it_from_recovery():
    [problem] = check(info="ibv_devinfo_none.txt", enabled=False)
    assert "Recovery" in problem and "`rdma_ctl enable`" in problem


def test_missing_device_is_named_with_the_ones_that_exist():
    [problem] = check(wanted=["rdma_en5"], info="ibv_devinfo_mixed.txt")
    assert problem.startswith("rdma_en5 does not exist") and "rdma_en2, rdma_en3, rdma_en4" in problem


def test_missing_device_on_a_mac_with_none_says_to_reboot():
    [problem] = check(info="ibv_devinfo_none.txt")
    assert problem.startswith("rdma_en4 does not exist") and "reboot" in problem


def test_named_device_down_while_another_is_active_suggests_the_active_one():
    assert check(wanted=["rdma_en3"], info="ibv_devinfo_mixed.txt") == [
        "rdma_en3 is PORT_DOWN; rdma_en4 is PORT_ACTIVE — did you mean rdma_en4? fix cluster_rdma in the inventory"
    ]


def test_down_device_with_nothing_active_points_at_cable_and_peer():
    [problem] = check(info="ibv_devinfo_one_down.txt")
    assert problem.startswith("rdma_en4 is PORT_DOWN") and "cable" in problem and "rdma_ctl status" in problem


def test_active_device_already_wanted_is_not_suggested():
    [problem] = check(wanted=["rdma_en3", "rdma_en4"], info="ibv_devinfo_mixed.txt")
    assert "did you mean" not in problem


def test_two_cable_row_with_one_cable_down_says_the_other_is_active():
    """rdma_en3 and rdma_en4 are both in the row; en4 is up, so 'no other device is active' would be false."""
    [problem] = check(wanted=["rdma_en3", "rdma_en4"], info="ibv_devinfo_mixed.txt")
    assert "no other RDMA device here is active" not in problem, problem
    assert problem.startswith("rdma_en3 is PORT_DOWN while rdma_en4 (also in cluster_rdma) is PORT_ACTIVE")
    assert "cable on the en3 port" in problem


def test_empty_gid_table_is_not_ready():
    """ibv_devinfo -v printed the port's details but no GID: the handshake would fail (RTR errno 96)."""
    ipv4 = macos.parse_ifconfig_ipv4_by_iface(capture("ifconfig_all.txt"))
    assert macos.parse_ibv_devinfo(capture("ibv_devinfo_v_empty_gids.txt"))["rdma_en4"]["ports"][1]["gids"] == []
    [problem] = check(info="ibv_devinfo_v_empty_gids.txt", ipv4=ipv4)
    assert problem.startswith("rdma_en4 has an empty GID table") and "errno 96" in problem
    assert "Thunderbolt Bridge" in problem and "IPv4" in problem
    [problem] = check(info="ibv_devinfo_v_empty_gids.txt")  # without ifconfig, the same verdict
    assert problem.startswith("rdma_en4 has an empty GID table")


def test_before_the_thunderbolt_network_opt_in_only_what_it_cannot_fix_is_judged():
    """network=False: bridge, IPv4 and GID are left to the check after mac_hygiene; a down port is not."""
    members = macos.parse_ifconfig_bridge_members(capture("ifconfig_bridge0_members.txt"))
    no_ipv4 = {"en4": []}
    assert (
        macos.check_node_rdma(
            ["rdma_en4"], devinfo("ibv_devinfo_v_empty_gids.txt"), True, members, None, no_ipv4, network=False
        )
        == []
    )
    [problem] = macos.check_node_rdma(
        ["rdma_en3"], devinfo("ibv_devinfo_mixed.txt"), True, members, None, no_ipv4, network=False
    )
    assert problem.startswith("rdma_en3 is PORT_DOWN")
    assert len(macos.check_node_rdma(["rdma_en4"], devinfo("ibv_devinfo_v_empty_gids.txt"), True, members)) == 1


def test_plain_devinfo_prints_no_gid_table_and_is_not_judged_on_it():
    assert check(info="ibv_devinfo_one_active.txt") == []


def test_no_ipv4_mapped_gid_says_to_give_the_interface_an_ipv4():
    [problem] = check(info="ibv_devinfo_v_no_ipv4.txt")
    assert problem.startswith("rdma_en4 has no IPv4-mapped GID") and "give en4 an IPv4 address" in problem


def test_expanded_ipv4_mapped_gid_counts():
    assert check(info="ibv_devinfo_v_expanded_gids.txt") == []


def test_interface_without_ipv4_is_reported_from_ifconfig():
    ipv4 = {"en4": macos.parse_ifconfig_ipv4(capture("ifconfig_en4_no_ipv4.txt"))}
    [problem] = check(info="ibv_devinfo_one_active.txt", ipv4=ipv4)
    assert "give en4 an IPv4 address" in problem


def test_bridge_member_says_to_remove_it_from_the_thunderbolt_bridge():
    members = macos.parse_ifconfig_bridge_members(capture("ifconfig_bridge0_members.txt"))
    [problem] = check(members=members)
    assert (
        problem.startswith("en4 (paired with rdma_en4) is a member of the Thunderbolt Bridge")
        and "remove en4 from the Thunderbolt Bridge" in problem
    )


def test_bridge_member_is_reported_even_when_rdma_is_disabled():
    problems = check(info="ibv_devinfo_none.txt", enabled=False, members=["en4"])
    assert len(problems) == 2 and "Thunderbolt Bridge" in problems[1]


def test_tb4_link_on_the_wanted_port_says_to_use_thunderbolt_5():
    assert check(info="ibv_devinfo_one_active.txt", tb=links(TB4)) == [
        "rdma_en4: the Thunderbolt link on en4 (receptacle 3) runs at 40 Gb/s; Thunderbolt 4 or lower cannot "
        "carry RDMA — use a Thunderbolt 5 port and cable (80 Gb/s) on both Macs"
    ]


def test_tb4_mac_without_port_names_is_reported_for_the_node():
    [problem] = check(tb=links(TB4, mapped=False))
    assert problem.startswith("rdma_en4: no Mac-to-Mac Thunderbolt link here reaches 80 Gb/s (fastest 40 Gb/s)")


def test_tb5_link_raises_no_speed_problem_without_port_names():
    assert check(tb=links(TB5, mapped=False)) == []


def test_inventory_row_with_null_and_per_cable_lists_is_accepted():
    assert check(wanted=[None, ["rdma_en4", "rdma_en4"]]) == []


# --------------------------------------------------------------------------- Ansible filters


def test_filter_plugin_exposes_every_public_function_once():
    spec = importlib.util.spec_from_file_location("macos_rdma_filters", PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    filters = plugin.FilterModule().filters()
    assert sorted(f.__name__ for f in filters.values()) == sorted(
        name
        for module in (macos, mac_hygiene)
        for name, value in vars(module).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    )
