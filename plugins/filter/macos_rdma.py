"""Ansible filters that read macOS tool output and check a node's RDMA readiness.

Thin wrappers over ``mlx_jaccl_cluster.ops.macos`` (parsers, readiness) and
``mlx_jaccl_cluster.ops.mac_hygiene`` (what mac_hygiene changes); a parse error becomes an
``AnsibleFilterError`` naming what was wrong. In a play::

    devinfo: "{{ __ibv_devinfo.stdout | mjc_parse_ibv_devinfo }}"
    problems: "{{ cluster_rdma | mjc_check_node_rdma(devinfo, rdma_on, members, links, ipv4) }}"
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

try:
    from mlx_jaccl_cluster.ops import mac_hygiene, macos
except ImportError:  # not installed on the controller: use the repository's copy
    sys.path.insert(
        0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "runtime"))
    )
    from mlx_jaccl_cluster.ops import mac_hygiene, macos

from ansible.errors import AnsibleFilterError

FILTERS: dict[str, Callable[..., Any]] = {
    "mjc_parse_ibv_devices": macos.parse_ibv_devices,
    "mjc_parse_ibv_devinfo": macos.parse_ibv_devinfo,
    "mjc_parse_rdma_ctl_status": macos.parse_rdma_ctl_status,
    "mjc_parse_sw_vers": macos.parse_sw_vers,
    "mjc_macos_at_least": macos.macos_at_least,
    "mjc_parse_thunderbolt": macos.parse_thunderbolt,
    "mjc_parse_link_speed": macos.parse_link_speed,
    "mjc_link_gbps": macos.link_gbps,
    "mjc_port_link_gbps": macos.port_link_gbps,
    "mjc_parse_hardware_ports": macos.parse_hardware_ports,
    "mjc_parse_ifconfig_bridge_members": macos.parse_ifconfig_bridge_members,
    "mjc_parse_ifconfig_ipv4": macos.parse_ifconfig_ipv4,
    "mjc_parse_ifconfig_ipv4_by_iface": macos.parse_ifconfig_ipv4_by_iface,
    "mjc_gid_ipv4": macos.gid_ipv4,
    "mjc_active_rdma_devices": macos.active_rdma_devices,
    "mjc_paired_interface": macos.paired_interface,
    "mjc_check_node_rdma": macos.check_node_rdma,
    # mac_hygiene role: pmset and the Thunderbolt network
    "mjc_parse_pmset": macos.parse_pmset,
    "mjc_pmset_changes": mac_hygiene.pmset_changes,
    "mjc_pmset_unsupported": mac_hygiene.pmset_unsupported,
    "mjc_pmset_argv": mac_hygiene.pmset_argv,
    "mjc_pmset_record": mac_hygiene.pmset_record,
    "mjc_pmset_restore": mac_hygiene.pmset_restore,
    "mjc_parse_ifconfig_status_by_iface": macos.parse_ifconfig_status_by_iface,
    "mjc_rdma_interfaces": macos.rdma_interfaces,
    "mjc_thunderbolt_network_plan": mac_hygiene.thunderbolt_network_plan,
    "mjc_thunderbolt_network_record": mac_hygiene.thunderbolt_network_record,
    "mjc_thunderbolt_network_restore": mac_hygiene.thunderbolt_network_restore,
}


def _as_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with its ``ValueError`` raised as an ``AnsibleFilterError`` that names the filter."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ValueError as exc:
            raise AnsibleFilterError(f"{name}: {exc}") from None

    return wrapper


class FilterModule:
    """Registers the mjc_* macOS RDMA filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {name: _as_filter(name, function) for name, function in FILTERS.items()}
