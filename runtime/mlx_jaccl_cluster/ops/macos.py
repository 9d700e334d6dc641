"""Read macOS tool output and decide whether a node can carry JACCL (RDMA over Thunderbolt).

Pure functions over the text (or JSON) that ``ibv_devices``, ``ibv_devinfo [-v]``,
``rdma_ctl status``, ``sw_vers``, ``system_profiler SPThunderboltDataType -json``,
``networksetup -listallhardwareports``, ``ifconfig`` and ``pmset -g custom`` print (tool
output -> facts), so the logic runs and is tested anywhere; only the Ansible tasks that
capture the text need a Mac.

``check_node_rdma`` turns the parsed facts into problem messages that each name the
device (or interface) and the fix; an empty list means the node is ready. What the
mac_hygiene role changes from these facts is :mod:`.mac_hygiene`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Thunderbolt 5 links train at 80 Gb/s; Thunderbolt 4 (40 Gb/s) shows rdma_en* devices
# but cannot carry RDMA.
TB5_GBPS = 80.0
# macOS that first ships RDMA over Thunderbolt.
MIN_MACOS = (26, 2)

_EMPTY_DEVICE_LIST = ("no ib devices found",)
_DEVICE_ROW = re.compile(r"^\s*(\S+)\s+([0-9a-fA-F]{16})\s*$")
_HEADER_ROW = re.compile(r"^\s*(device\s+node GUID|-+\s+-+)\s*$")
_GID = re.compile(r"^GID\[\s*(\d+)\]:\s*([^,\s]+)(?:,\s*(.*))?$")
_KEY_VALUE = re.compile(r"^([A-Za-z_][\w]*):\s*(.*)$")
_CODED = re.compile(r"^(.*?)\s*\((\d+)\)$")
_SPEED = re.compile(r"([\d.]+(?:/[\d.]+)*)\s*Gb/s", re.IGNORECASE)
_IFCONFIG_HEAD = re.compile(r"^([A-Za-z0-9_.]+): flags=", re.MULTILINE)
_IFCONFIG_INET = re.compile(r"^\s*inet\s+(\d{1,3}(?:\.\d{1,3}){3})\b", re.MULTILINE)
_BRIDGE_MEMBER = re.compile(r"^\s*member:\s*(\S+)", re.MULTILINE)


# --------------------------------------------------------------------------- ibverbs


def parse_ibv_devices(text: str) -> list[dict[str, str]]:
    """Devices listed by ``ibv_devices``: ``[{"name": "rdma_en4", "guid": "e2c5..."}]``.

    Header-only output and ``No IB devices found`` (RDMA disabled) give ``[]``; any
    other unrecognised line raises ``ValueError`` so an error text is never read as
    "no devices".
    """
    devices = []
    for line in text.splitlines():
        if not line.strip() or _HEADER_ROW.match(line) or line.strip().lower() in _EMPTY_DEVICE_LIST:
            continue
        row = _DEVICE_ROW.match(line)
        if not row:
            raise ValueError(f"unexpected line in ibv_devices output: {line.strip()!r}")
        devices.append({"name": row.group(1), "guid": row.group(2).lower()})
    return devices


def _split_code(value: str) -> tuple[str, int | None]:
    """``"PORT_ACTIVE (4)"`` -> ``("PORT_ACTIVE", 4)``; text without a code -> ``(text, None)``."""
    coded = _CODED.match(value.strip())
    if coded:
        return coded.group(1), int(coded.group(2))
    return value.strip(), None


def _new_port() -> dict[str, Any]:
    """A port record before its lines are read."""
    return {"state": None, "state_code": None, "active_mtu": None, "link_layer": None, "gids": []}


def _read_port_line(port: dict[str, Any], key: str, value: str) -> None:
    """Store one ``key: value`` line of a port block (keys the checks do not use are skipped)."""
    text, code = _split_code(value)
    if key == "state":
        port["state"], port["state_code"] = text, code
    elif key == "active_mtu":
        port["active_mtu"] = int(text) if text.isdigit() else text
    elif key in ("link_layer", "active_speed", "active_width"):
        port[key] = text
    elif key == "gid_tbl_len":  # only -v prints it, and then the GID lines follow: an empty table is known
        port["gid_tbl_len"] = int(text) if text.isdigit() else text


def parse_ibv_devinfo(text: str) -> dict[str, dict[str, Any]]:
    """Devices and ports printed by ``ibv_devinfo`` (plain or ``-v``).

    Returns ``{name: {"transport": "Thunderbolt", "ports": {1: {"state": "PORT_ACTIVE",
    "state_code": 4, "active_mtu": 4096, "link_layer": "Thunderbolt", "gids": [...]}}}}``;
    ``-v`` adds ``active_speed`` / ``active_width`` (``"10.0 Gbps"`` / ``"8X"``) and the GID
    table, each GID as printed (compressed ``::ffff:169.254.12.34`` or expanded
    ``0000:...:ffff:a9fe:0c22``, a trailing ``, RoCE v2`` dropped).
    ``No IB devices found`` gives ``{}``; other text with no ``hca_id`` raises ``ValueError``.
    """
    devices: dict[str, dict[str, Any]] = {}
    device: dict[str, Any] | None = None
    port: dict[str, Any] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        gid = _GID.match(line)
        if gid and port is not None:
            port["gids"].append(gid.group(2))
            continue
        pair = _KEY_VALUE.match(line)
        if not pair:
            continue
        key, value = pair.groups()
        if key == "hca_id":
            device = devices[value.strip()] = {"transport": None, "ports": {}}
            port = None
        elif device is None:
            continue
        elif key == "port" and value.strip().isdigit():
            port = device["ports"][int(value)] = _new_port()
        elif key == "transport":
            device["transport"] = _split_code(value)[0]
        elif port is not None:
            _read_port_line(port, key, value)
    if not devices and text.strip() and text.strip().lower() not in _EMPTY_DEVICE_LIST:
        raise ValueError(f"ibv_devinfo printed no hca_id block: {text.strip()[:200]!r}")
    return devices


def gid_ipv4(gid: str) -> str | None:
    """The IPv4 address inside an IPv4-mapped GID (either printed form), else ``None``."""
    try:
        mapped = ipaddress.IPv6Address(gid.split("%")[0]).ipv4_mapped
    except ValueError:
        return None
    return str(mapped) if mapped else None


def active_rdma_devices(devinfo: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names of the devices with a port in ``PORT_ACTIVE``, sorted."""
    return sorted(name for name, dev in devinfo.items() if _device_state(dev) == "PORT_ACTIVE")


def _device_state(device: Mapping[str, Any]) -> str:
    """``PORT_ACTIVE`` if any port is active, else the first port's state (``no port`` if none)."""
    states = [p.get("state") or "UNKNOWN" for p in device.get("ports", {}).values()]
    if "PORT_ACTIVE" in states:
        return "PORT_ACTIVE"
    return states[0] if states else "no port"


def _gid_table_empty(device: Mapping[str, Any]) -> bool:
    """``ibv_devinfo -v`` printed the GID table of an active port and it holds no GID.

    Plain ``ibv_devinfo`` prints no table at all: then nothing is known and nothing is judged.
    """
    ports = [p for p in device.get("ports", {}).values() if p.get("state") == "PORT_ACTIVE"]
    return bool(ports) and all("gid_tbl_len" in p and not p.get("gids") for p in ports)


def _device_gids(device: Mapping[str, Any]) -> list[str]:
    """Every GID of every port of a device."""
    return [g for p in device.get("ports", {}).values() for g in p.get("gids", [])]


# --------------------------------------------------------------------------- macOS state


def parse_rdma_ctl_status(text: str) -> bool:
    """``rdma_ctl status`` -> ``True`` (enabled) / ``False`` (disabled); anything else raises."""
    word = text.strip().lower()
    if word in ("enabled", "disabled"):
        return word == "enabled"
    raise ValueError(
        f"rdma_ctl status printed {text.strip()[:200]!r}, expected 'enabled' or 'disabled' "
        f"(rdma_ctl exists from macOS {'.'.join(map(str, MIN_MACOS))} on)"
    )


def _version_tuple(version: str | Iterable[Any]) -> tuple[int, ...]:
    """``"26.3"`` / ``[26, 3]`` / ``("26", "3")`` -> ``(26, 3)``."""
    parts = version.strip().split(".") if isinstance(version, str) else list(version)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"not a version: {version!r}") from None


def parse_sw_vers(text: str) -> tuple[int, ...]:
    """macOS version from ``sw_vers`` (``ProductVersion:`` line) or ``sw_vers -productVersion``."""
    found = re.search(r"^\s*ProductVersion:\s*(\d+(?:\.\d+)*)\s*$", text, re.MULTILINE)
    bare = re.fullmatch(r"\s*(\d+(?:\.\d+)*)\s*", text)
    match = found or bare
    if not match:
        raise ValueError(f"no ProductVersion in sw_vers output: {text.strip()[:200]!r}")
    return _version_tuple(match.group(1))


def macos_at_least(version: str | Sequence[Any], minimum: str | Sequence[Any] = MIN_MACOS) -> bool:
    """Whether ``version`` >= ``minimum`` (missing parts count as 0: ``(26,)`` == ``(26, 0)``)."""
    have, want = _version_tuple(version), _version_tuple(minimum)
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) >= want + (0,) * (width - len(want))


# --------------------------------------------------------------------------- Thunderbolt


def parse_link_speed(text: str | None) -> float | None:
    """Gb/s in a ``current_speed_key`` value: ``"80 Gb/s"`` -> 80, ``"Up to 10/20 Gb/s x1/x2"`` -> 20."""
    found = _SPEED.search(text or "")
    if not found:
        return None
    return max(float(n) for n in found.group(1).split("/") if n)


def parse_hardware_ports(text: str) -> dict[str, str]:
    """``networksetup -listallhardwareports`` -> ``{"Thunderbolt 1": "en2", "Wi-Fi": "en1", ...}``."""
    ports, name = {}, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Hardware Port":
            name = value.strip()
        elif key.strip() == "Device" and name is not None:
            ports[name] = value.strip()
            name = None
    return ports


def _load_thunderbolt(data: str | Mapping[str, Any] | Sequence[Any]) -> list[Mapping[str, Any]]:
    """The bus list of ``system_profiler SPThunderboltDataType -json`` (text, document or list)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"system_profiler SPThunderboltDataType -json is not JSON: {exc}") from None
    if isinstance(data, Mapping):
        data = data.get("SPThunderboltDataType", [])
    if not isinstance(data, Sequence):
        raise ValueError("expected the SPThunderboltDataType list of Thunderbolt buses")
    return [bus for bus in data if isinstance(bus, Mapping)]


def _receptacle(bus: Mapping[str, Any]) -> Mapping[str, Any]:
    """The bus's host receptacle (``receptacle_1_tag``, or the first ``receptacle_*_tag``)."""
    tags = [key for key in bus if key.startswith("receptacle_") and key.endswith("_tag")]
    return bus.get("receptacle_1_tag") or (bus[sorted(tags)[0]] if tags else {})


def parse_thunderbolt(
    data: str | Mapping[str, Any] | Sequence[Any], hardware_ports: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """One record per Thunderbolt bus (host port) from ``system_profiler SPThunderboltDataType -json``.

    Each: ``bus``, ``receptacle`` (the number macOS names the port by, "Thunderbolt N"),
    ``connected``, ``speed`` (as printed), ``speed_gbps``, ``speed_is_capability`` (idle ports
    print "Up to ..."), ``domain_uuid``, ``peer`` / ``peer_domain_uuid`` (first device on the
    cable; a Mac has a domain UUID, a drive or dock does not), ``peer_is_mac`` and
    ``interface``: the ``enN`` of that port when ``hardware_ports`` (from
    ``parse_hardware_ports``) is given, else ``None``.
    """
    links = []
    for bus in _load_thunderbolt(data):
        tag = _receptacle(bus)
        if not tag:
            continue
        receptacle = str(tag.get("receptacle_id_key", "")) or None
        peer = next((item for item in bus.get("_items", []) if isinstance(item, Mapping)), {})
        speed = tag.get("current_speed_key")
        links.append(
            {
                "bus": bus.get("_name"),
                "receptacle": int(receptacle) if receptacle and receptacle.isdigit() else receptacle,
                "connected": tag.get("receptacle_status_key") == "receptacle_connected",
                "speed": speed,
                "speed_gbps": parse_link_speed(speed),
                "speed_is_capability": str(speed or "").lower().startswith("up to"),
                "domain_uuid": bus.get("domain_uuid_key"),
                "peer": peer.get("_name"),
                "peer_domain_uuid": peer.get("domain_uuid_key"),
                "peer_is_mac": bool(peer.get("domain_uuid_key")),
                "interface": (hardware_ports or {}).get(f"Thunderbolt {receptacle}"),
            }
        )
    return links


# --------------------------------------------------------------------------- ifconfig


def parse_ifconfig_bridge_members(text: str) -> list[str]:
    """Interfaces in ``member:`` lines of ``ifconfig bridge0`` (``[]`` when the bridge is absent)."""
    return _BRIDGE_MEMBER.findall(text)


def parse_ifconfig_ipv4(text: str) -> list[str]:
    """IPv4 addresses (``inet`` lines, not ``inet6``) in ``ifconfig enN`` output."""
    return _IFCONFIG_INET.findall(text)


def parse_ifconfig_ipv4_by_iface(text: str) -> dict[str, list[str]]:
    """``{interface: [IPv4, ...]}`` for every interface block of a plain ``ifconfig`` run."""
    heads = list(_IFCONFIG_HEAD.finditer(text))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return {h.group(1): parse_ifconfig_ipv4(text[h.start() : end]) for h, end in zip(heads, ends)}


# --------------------------------------------------------------------------- readiness


def paired_interface(device: str) -> str:
    """The network interface an RDMA device pairs with: ``rdma_en4`` -> ``en4``."""
    return device[len("rdma_") :] if device.startswith("rdma_") else device


def _wanted(devices_wanted: Iterable[Any]) -> list[str]:
    """Device names from an inventory row: ``None`` cells skipped, per-cable lists flattened, deduplicated."""
    names: list[str] = []
    for cell in [devices_wanted] if isinstance(devices_wanted, str) else devices_wanted or []:
        for name in [cell] if isinstance(cell, str) or cell is None else cell:
            if name and name not in names:
                names.append(str(name))
    return names


def _gbps(value: float) -> str:
    """``40.0`` -> ``"40 Gb/s"``."""
    return f"{value:g} Gb/s"


def _missing_message(name: str, present: list[str]) -> str:
    """A wanted device that ``ibv_devinfo`` does not list."""
    if not present:
        return (
            f"{name} does not exist: this Mac lists no RDMA devices although rdma_ctl reports enabled — "
            f"reboot once after `rdma_ctl enable`, and check it is an Apple-silicon Mac with Thunderbolt 5 "
            f"on macOS {'.'.join(map(str, MIN_MACOS))} or later"
        )
    return (
        f"{name} does not exist on this Mac (RDMA devices here: {', '.join(present)}) — "
        f"fix cluster_rdma in the inventory"
    )


def _inactive_message(name: str, state: str, spare_active: list[str], wanted_active: Sequence[str] = ()) -> str:
    """A wanted device that is not ``PORT_ACTIVE``; names the active devices nobody asked for,
    else the other devices of the row that are active (RDMA works here: this cable does not)."""
    if len(spare_active) == 1:
        other = spare_active[0]
        return f"{name} is {state}; {other} is PORT_ACTIVE — did you mean {other}? fix cluster_rdma in the inventory"
    if spare_active:
        return (
            f"{name} is {state}; {', '.join(spare_active)} are PORT_ACTIVE — did you mean one of them? "
            f"fix cluster_rdma in the inventory"
        )
    if wanted_active:
        verb = "is" if len(wanted_active) == 1 else "are"
        return (
            f"{name} is {state} while {', '.join(wanted_active)} (also in cluster_rdma) {verb} PORT_ACTIVE, so RDMA "
            f"works on this Mac: check the Thunderbolt cable on the {paired_interface(name)} port and that the "
            f"Mac at its other end is on and has RDMA enabled (`rdma_ctl status` there)"
        )
    return (
        f"{name} is {state} and no other RDMA device here is active: check the Thunderbolt cable on the "
        f"{paired_interface(name)} port and that the Mac at the other end is on and has RDMA enabled "
        f"(`rdma_ctl status` there)"
    )


def _ipv4_message(
    name: str, device: Mapping[str, Any], ipv4_by_iface: Mapping[str, Sequence[str]] | None
) -> str | None:
    """Problem when the GID table (``-v`` output) or ``ifconfig`` shows no IPv4 for the device."""
    iface = paired_interface(name)
    gids = _device_gids(device)
    no_mapped_gid = bool(gids) and not any(gid_ipv4(g) for g in gids)
    no_address = ipv4_by_iface is not None and iface in ipv4_by_iface and not ipv4_by_iface[iface]
    if not (no_mapped_gid or no_address):
        return None
    return (
        f"{name} has no IPv4-mapped GID ({iface} has no IPv4 address), so MLX fails with "
        f"'No IPv4-mapped GID': give {iface} an IPv4 address (link-local 169.254.x.y is fine)"
    )


def _empty_gid_message(name: str) -> str:
    """``-v`` shows the active port with no GID at all: the symptom the bridge message warns about."""
    iface = paired_interface(name)
    return (
        f"{name} has an empty GID table, so the RDMA handshake fails (RTR errno 96) — take {iface} out of the "
        f"Thunderbolt Bridge and give it an IPv4 address (link-local 169.254.x.y is fine), or turn on "
        f"mac_hygiene_thunderbolt_network_enabled, which does both; then check `ibv_devinfo -v -d {name}` lists "
        f"a GID like ::ffff:169.254.x.y"
    )


def _bridge_message(name: str) -> str:
    """The paired interface is bridged: empty GID table, handshake fails."""
    iface = paired_interface(name)
    return (
        f"{iface} (paired with {name}) is a member of the Thunderbolt Bridge (bridge0), which leaves the "
        f"GID table empty and fails the RDMA handshake (RTR errno 96) — remove {iface} from the Thunderbolt "
        f"Bridge (System Settings > Network > Thunderbolt Bridge)"
    )


def _slow_link(link: Mapping[str, Any]) -> bool:
    """A link whose speed is known and below Thunderbolt 5's 80 Gb/s."""
    return link.get("speed_gbps") is not None and link["speed_gbps"] < TB5_GBPS


def _speed_messages(names: list[str], tb_links: Sequence[Mapping[str, Any]]) -> list[str]:
    """Thunderbolt 4-or-lower problems: per device when links name their ``enN``, else per node."""
    fix = "Thunderbolt 4 or lower cannot carry RDMA — use a Thunderbolt 5 port and cable (80 Gb/s) on both Macs"
    by_iface = {link["interface"]: link for link in tb_links if link.get("interface")}
    if by_iface:
        slow = [
            (name, by_iface[paired_interface(name)])
            for name in names
            if _slow_link(by_iface.get(paired_interface(name), {}))
        ]
        return [
            f"{name}: the Thunderbolt link on {paired_interface(name)} (receptacle {link.get('receptacle')}) "
            f"runs at {_gbps(link['speed_gbps'])}; {fix}"
            for name, link in slow
        ]
    mac_links = [link for link in tb_links if link.get("connected") and link.get("peer_is_mac")]
    if names and mac_links and all(_slow_link(link) for link in mac_links):
        fastest = max(link["speed_gbps"] for link in mac_links)
        return [
            f"{', '.join(names)}: no Mac-to-Mac Thunderbolt link here reaches 80 Gb/s (fastest {_gbps(fastest)}); {fix}"
        ]
    return []


def check_node_rdma(
    devices_wanted: Sequence[Any],
    devinfo: Mapping[str, Mapping[str, Any]],
    rdma_enabled: bool,
    bridge_members: Sequence[str],
    tb_links: Sequence[Mapping[str, Any]] | None = None,
    ipv4_by_iface: Mapping[str, Sequence[str]] | None = None,
    network: bool = True,
) -> list[str]:
    """Problems that keep this node from JACCL over the inventory's devices (``[]`` = ready).

    ``network=False`` leaves out what the Thunderbolt-network opt-in (mac_hygiene) changes:
    bridge membership, IPv4 addresses and the GID table. Readiness judges those after it ran.

    ``devices_wanted``: device names (an inventory ``cluster_rdma`` row works: ``None`` and
    per-cable lists are handled). ``devinfo``: ``parse_ibv_devinfo``. ``bridge_members``:
    ``parse_ifconfig_bridge_members``. ``tb_links``: ``parse_thunderbolt`` (optional).
    ``ipv4_by_iface``: ``{"en4": ["169.254.12.34"]}`` (optional; interfaces left out are not judged).
    """
    names = _wanted(devices_wanted)
    bridge_members = bridge_members if network else []
    problems = [_bridge_message(n) for n in names if paired_interface(n) in set(bridge_members or [])]
    if not rdma_enabled:
        return [
            "RDMA over Thunderbolt is disabled on this Mac: boot into macOS Recovery, open Terminal, run "
            "`rdma_ctl enable`, then reboot (it cannot be enabled remotely)"
        ] + problems
    present = sorted(devinfo)
    active = active_rdma_devices(devinfo)
    spare_active = [d for d in active if d not in names]
    for name in names:
        if name not in devinfo:
            problems.append(_missing_message(name, present))
        elif _device_state(devinfo[name]) != "PORT_ACTIVE":
            wanted_active = [d for d in names if d in active]
            problems.append(_inactive_message(name, _device_state(devinfo[name]), spare_active, wanted_active))
        elif network and paired_interface(name) not in set(bridge_members or []):
            if _gid_table_empty(devinfo[name]):
                problems.append(_empty_gid_message(name))
            else:
                problems += [m for m in [_ipv4_message(name, devinfo[name], ipv4_by_iface)] if m]
    return problems + _speed_messages(names, tb_links or [])


# --------------------------------------------------------------------------- link speed

_WIDTH = re.compile(r"^(\d+)X$", re.IGNORECASE)
_GBPS = re.compile(r"^([\d.]+)\s*Gbps$", re.IGNORECASE)


def port_link_gbps(port: Mapping[str, Any]) -> float | None:
    """Signalling rate of one ``ibv_devinfo -v`` port: active_speed x active_width (10.0 Gbps x 8X = 80)."""
    speed = _GBPS.match(str(port.get("active_speed") or ""))
    width = _WIDTH.match(str(port.get("active_width") or ""))
    if not speed or not width:
        return None
    return float(speed.group(1)) * int(width.group(1))


def link_gbps(devinfo: Mapping[str, Mapping[str, Any]], devices: Iterable[str] | None = None) -> float | None:
    """Slowest active link among ``devices`` (all when None): the peak a collective can reach; None if unknown."""
    wanted = None if devices is None else set(devices)
    speeds = [
        port_link_gbps(port)
        for name, device in devinfo.items()
        if wanted is None or name in wanted
        for port in device.get("ports", {}).values()
        if port.get("state") == "PORT_ACTIVE"
    ]
    known = [s for s in speeds if s]
    return min(known) if known else None


# --------------------------------------------------------------------------- pmset

_PMSET_HEADER = re.compile(r"^(\S[^:]*):\s*$")
# " sleep                1 (sleep prevented by sharingd, powerd)": a name (which may hold
# spaces: "Sleep On Power Button"), one value word, then an optional note in parentheses.
_PMSET_LINE = re.compile(r"^\s+(\S.*?)\s+(\S+)(?:\s+\(.*\))?\s*$")


def parse_pmset(text: str) -> dict[str, dict[str, str]]:
    """Settings per section of ``pmset -g custom`` (or ``pmset -g``), values as printed.

    ``{"AC Power": {"sleep": "1", "womp": "1", "Sleep On Power Button": "1", ...}}``; a
    trailing note such as ``(sleep prevented by powerd)`` is dropped. Text with a setting
    before any section header, or with no section at all, raises ``ValueError``.
    """
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        header = _PMSET_HEADER.match(line)
        if header:
            current = sections.setdefault(header.group(1).strip(), {})
            continue
        setting = _PMSET_LINE.match(line)
        if not setting or current is None:
            raise ValueError(f"unexpected line in pmset output: {line.strip()[:200]!r}")
        current[setting.group(1)] = setting.group(2)
    if not sections:
        raise ValueError(f"pmset printed no section: {text.strip()[:200]!r}")
    return sections


# --------------------------------------------------------------------------- ifconfig status

_IFCONFIG_STATUS = re.compile(r"^\s*status:\s*(\S+)", re.MULTILINE)
INTERFACE_NAME = re.compile(r"^en[0-9]+$")  # a Thunderbolt port's network interface


def parse_ifconfig_status_by_iface(text: str) -> dict[str, str | None]:
    """``{interface: "active" | "inactive" | None}`` (its ``status:`` line) for every interface block of ``ifconfig``."""
    heads = list(_IFCONFIG_HEAD.finditer(text))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    found = {h.group(1): _IFCONFIG_STATUS.search(text[h.start() : end]) for h, end in zip(heads, ends)}
    return {name: (status.group(1) if status else None) for name, status in found.items()}


def rdma_interfaces(devices_wanted: Any) -> list[str]:
    """The ``enN`` ports behind the RDMA devices an inventory row names, in order:
    ``[None, "rdma_en4", ["rdma_en3", "rdma_en5"]]`` -> ``["en4", "en3", "en5"]``.
    A name that is not ``rdma_enN`` raises ``ValueError`` (it is passed to root's scripts)."""
    names = _wanted(devices_wanted)
    bad = [n for n in names if not (n.startswith("rdma_") and INTERFACE_NAME.match(paired_interface(n)))]
    if bad:
        raise ValueError(f"not RDMA device names like rdma_en4: {', '.join(map(repr, bad))}")
    return [paired_interface(n) for n in names]
