"""Read macOS tool output and decide whether a node can carry JACCL (RDMA over Thunderbolt).

Pure functions over the text (or JSON) that ``ibv_devices``, ``ibv_devinfo [-v]``,
``rdma_ctl status``, ``sw_vers``, ``system_profiler SPThunderboltDataType -json``,
``networksetup -listallhardwareports`` and ``ifconfig`` print, so the logic runs and is
tested anywhere; only the Ansible tasks that capture the text need a Mac.

``check_node_rdma`` turns the parsed facts into problem messages that each name the
device (or interface) and the fix; an empty list means the node is ready.
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


def _size(n_bytes: int) -> str:
    """Decimal units as Finder shows them: ``3_200_000_000`` -> ``"3.2 GB"``, ``512`` -> ``"512 B"``."""
    value, unit = float(n_bytes), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{n_bytes} B" if unit == "B" else f"{value:.1f} {unit}"


def check_disk_free(free_bytes: int | str, needed_bytes: int | str, path: str) -> list[str]:
    """A problem when ``path`` has less than ``needed_bytes`` free (``[]`` when it fits)."""
    free, needed = int(free_bytes), int(needed_bytes)
    if free >= needed:
        return []
    return [
        f"{path}: {_size(free)} free but {_size(needed)} needed — free {_size(needed - free)} there "
        f"or put it on a larger volume"
    ]


# --------------------------------------------------------------------------- mac_hygiene: power (pmset)
#
# The mac_hygiene role changes only the pmset settings that differ from what it wants, and
# keeps the value each had before its first change so that uninstall can put it back.

# The power sources ``pmset -g custom`` prints, and the flag that sets each.
PMSET_SOURCE_FLAGS = {"AC Power": "-c", "Battery Power": "-b", "UPS Power": "-u"}

_PMSET_HEADER = re.compile(r"^(\S[^:]*):\s*$")
# " sleep                1 (sleep prevented by sharingd, powerd)": a name (which may hold
# spaces: "Sleep On Power Button"), one value word, then an optional note in parentheses.
_PMSET_LINE = re.compile(r"^\s+(\S.*?)\s+(\S+)(?:\s+\(.*\))?\s*$")
_PMSET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_PMSET_VALUE = re.compile(r"^[A-Za-z0-9_./-]+$")


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


def _pmset_value(value: Any) -> str:
    """A wanted value as pmset prints it: ``True`` -> ``"1"``, ``0`` -> ``"0"``."""
    text = str(int(value)) if isinstance(value, bool) else str(value).strip()
    if not _PMSET_VALUE.match(text):
        raise ValueError(f"not a pmset value: {value!r}")
    return text


def _pmset_wanted(wanted: Mapping[str, Any]) -> dict[str, str]:
    """``wanted`` checked: setting names pmset takes (one word) and one-word values."""
    bad = [name for name in wanted if not _PMSET_NAME.match(str(name))]
    if bad:
        raise ValueError(f"not pmset setting names: {', '.join(map(repr, bad))} (e.g. sleep, disksleep, womp)")
    return {str(name): _pmset_value(value) for name, value in wanted.items()}


def _pmset_sources(current: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The power sources of ``parse_pmset`` output, in pmset's flag order; none raises."""
    sources = [s for s in PMSET_SOURCE_FLAGS if s in current]
    if not sources:
        raise ValueError(
            f"no power source ({', '.join(PMSET_SOURCE_FLAGS)}) in the pmset settings "
            f"(sections: {', '.join(current) or 'none'}): read them with `pmset -g custom`"
        )
    return sources


def pmset_changes(current: Mapping[str, Mapping[str, str]], wanted: Mapping[str, Any]) -> list[dict[str, str]]:
    """The wanted settings that differ, per power source of ``current`` (``parse_pmset`` of
    ``pmset -g custom``), as ``pmset -a`` would change them.

    ``[{"source": "AC Power", "flag": "-c", "name": "sleep", "from": "1", "to": "0"}, ...]``.
    A setting a source does not list is not this Mac's (see ``pmset_unsupported``) and is
    left out; ``[]`` means nothing to do.
    """
    want = _pmset_wanted(wanted)
    return [
        {"source": source, "flag": PMSET_SOURCE_FLAGS[source], "name": name, "from": current[source][name], "to": value}
        for source in _pmset_sources(current)
        for name, value in want.items()
        if name in current[source] and current[source][name] != value
    ]


def pmset_unsupported(current: Mapping[str, Mapping[str, str]], wanted: Mapping[str, Any]) -> list[str]:
    """``"Battery Power: autorestart"`` for each wanted setting a power source does not list."""
    want = _pmset_wanted(wanted)
    return [f"{source}: {name}" for source in _pmset_sources(current) for name in want if name not in current[source]]


def pmset_argv(changes: Sequence[Mapping[str, str]]) -> list[list[str]]:
    """One ``pmset`` command per power source for ``changes`` (``pmset_changes`` or
    ``pmset_restore``): ``[["pmset", "-c", "sleep", "0", "disksleep", "0"]]``."""
    by_flag: dict[str, list[str]] = {}
    for change in changes:
        flag = change["flag"]
        if flag not in PMSET_SOURCE_FLAGS.values():
            raise ValueError(f"not a pmset power-source flag: {flag!r}")
        by_flag.setdefault(flag, []).extend(_pmset_wanted({change["name"]: change["to"]}).popitem())
    return [["pmset", flag] + by_flag[flag] for flag in PMSET_SOURCE_FLAGS.values() if flag in by_flag]


def pmset_record(state: Mapping[str, Any] | None, changes: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The state file once ``changes`` are applied: ``{"AC Power": {"sleep": {"before": "1",
    "set": "0"}}}``. A setting recorded earlier keeps its first ``before`` (the value it had
    before this role ever changed it); ``set`` is always the latest value applied."""
    record: dict[str, Any] = {
        source: {name: dict(entry) for name, entry in settings.items()} for source, settings in (state or {}).items()
    }
    for change in changes:
        entry = record.setdefault(change["source"], {}).setdefault(change["name"], {"before": change["from"]})
        entry["set"] = change["to"]
    return record


def pmset_restore(state: Mapping[str, Any] | None, current: Mapping[str, Mapping[str, str]]) -> dict[str, list[Any]]:
    """What uninstall does with the recorded ``state`` (``pmset_record``) and the settings now.

    ``{"changes": [...], "left": [...]}``: ``changes`` (the shape of ``pmset_changes``, for
    ``pmset_argv``) put back each ``before`` value where the setting still has the value
    this role set; a setting changed since by someone else is left as it is, with a line
    in ``left`` saying so.
    """
    changes: list[dict[str, str]] = []
    left: list[str] = []
    for source, settings in (state or {}).items():
        if source not in PMSET_SOURCE_FLAGS:
            raise ValueError(f"not a power source in the recorded pmset state: {source!r}")
        for name, entry in settings.items():
            now = current.get(source, {}).get(name)
            if now is None:
                left.append(f"{source}: {name} is not listed by pmset now; not restored to {entry['before']}")
            elif now == entry["before"]:
                continue
            elif now != entry["set"]:
                left.append(
                    f"{source}: {name} is {now} now, not the {entry['set']} this role set; "
                    f"left as it is (it was {entry['before']} before)"
                )
            else:
                changes.append(
                    {
                        "source": source,
                        "flag": PMSET_SOURCE_FLAGS[source],
                        "name": name,
                        "from": now,
                        "to": entry["before"],
                    }
                )
    return {"changes": changes, "left": left}


# --------------------------------------------------------------------------- mac_hygiene: Thunderbolt network
#
# The ports that carry RDMA must be outside the Thunderbolt Bridge and carry an IPv4 address
# (the IPv4-mapped GID). The role records each port's condition the first time it sees it,
# so uninstall can put back exactly that.

_IFCONFIG_STATUS = re.compile(r"^\s*status:\s*(\S+)", re.MULTILINE)
_INTERFACE = re.compile(r"^en[0-9]+$")


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
    bad = [n for n in names if not (n.startswith("rdma_") and _INTERFACE.match(paired_interface(n)))]
    if bad:
        raise ValueError(f"not RDMA device names like rdma_en4: {', '.join(map(repr, bad))}")
    return [paired_interface(n) for n in names]


def _interfaces(interfaces: Iterable[str]) -> list[str]:
    """``interfaces`` checked to be ``enN`` names."""
    names = list(interfaces or [])
    bad = [n for n in names if not _INTERFACE.match(str(n))]
    if bad:
        raise ValueError(f"not Thunderbolt network interfaces like en4: {', '.join(map(repr, bad))}")
    return [str(n) for n in names]


def thunderbolt_network_plan(
    interfaces: Iterable[str],
    bridge_members: Sequence[str],
    ipv4_by_iface: Mapping[str, Sequence[str]],
    status_by_iface: Mapping[str, str | None] | None = None,
) -> dict[str, list[str]]:
    """What keeping ``interfaces`` (``rdma_interfaces``) outside the bridge with an IPv4 takes now.

    ``bridge_members``: ``parse_ifconfig_bridge_members`` (``[]`` without a bridge);
    ``ipv4_by_iface`` / ``status_by_iface``: ``parse_ifconfig_ipv4_by_iface`` /
    ``parse_ifconfig_status_by_iface`` of a plain ``ifconfig``. Returns ``{"leave_bridge": [...],
    "need_ipv4": [...], "missing": [...]}``: ``missing`` are ports this Mac does not have;
    ``need_ipv4`` those with no IPv4 whose link is not down (a bridge member never has its
    own). Everything empty: nothing to do.
    """
    names = _interfaces(interfaces)
    present = [n for n in names if n in ipv4_by_iface]
    return {
        "leave_bridge": [n for n in present if n in set(bridge_members or [])],
        "need_ipv4": [n for n in present if not ipv4_by_iface[n] and (status_by_iface or {}).get(n) != "inactive"],
        "missing": [n for n in names if n not in ipv4_by_iface],
    }


def thunderbolt_network_record(
    state: Mapping[str, Any] | None,
    interfaces: Iterable[str],
    bridge: str,
    bridge_members: Sequence[str],
    ipv4_by_iface: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The state file: each port's condition the first time the role saw it (before any change).

    ``{"bridge": "bridge0", "interfaces": {"en4": {"bridge_member": true, "ipv4": []}}}``;
    ports recorded earlier keep their first record, new ports are added.
    """
    record: dict[str, Any] = {
        "bridge": (state or {}).get("bridge", bridge),
        "interfaces": {k: dict(v) for k, v in (state or {}).get("interfaces", {}).items()},
    }
    for name in _interfaces(interfaces):
        if name not in record["interfaces"] and name in ipv4_by_iface:
            record["interfaces"][name] = {
                "bridge_member": name in set(bridge_members or []),
                "ipv4": list(ipv4_by_iface[name]),
            }
    return record


def thunderbolt_network_restore(
    state: Mapping[str, Any] | None,
    bridge_members: Sequence[str],
    ipv4_by_iface: Mapping[str, Sequence[str]],
    bridge_present: bool = True,
) -> dict[str, list[str]]:
    """What uninstall does with the recorded ``state`` (``thunderbolt_network_record``) and ``ifconfig`` now.

    ``{"release_ipv4": [...], "rejoin_bridge": [...], "left": [...]}``: ports that had no
    IPv4 before and have one now give it up (``ipconfig set enN NONE``); ports that were
    bridge members and are not now go back (``ifconfig BRIDGE addm enN``), when the bridge
    still exists. ``left`` says what could not be put back.
    """
    state = state or {}
    bridge = state.get("bridge", "bridge0")
    members = set(bridge_members or [])
    release, rejoin, left = [], [], []
    for name, before in state.get("interfaces", {}).items():
        _interfaces([name])
        if name not in ipv4_by_iface:
            left.append(f"{name} does not exist now; nothing to put back")
            continue
        if not before.get("ipv4") and ipv4_by_iface[name]:
            release.append(name)
        if before.get("bridge_member") and name not in members:
            if bridge_present:
                rejoin.append(name)
            else:
                left.append(f"{name} was a member of {bridge}, which does not exist now; left out of it")
    return {"release_ipv4": release, "rejoin_bridge": rejoin, "left": left}


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
