"""What the mac_hygiene role changes on a Mac, and how uninstall puts it back.

Pure functions over facts the parsers in :mod:`.macos` read from ``pmset -g custom`` and
``ifconfig``: the pmset settings that differ from the wanted ones (and the record of their
values before), and the Thunderbolt ports to take out of the bridge or give an IPv4 address
(and the record of their condition before). Only the Ansible tasks that apply them need a Mac.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .macos import INTERFACE_NAME

# --------------------------------------------------------------------------- mac_hygiene: power (pmset)
#
# The mac_hygiene role changes only the pmset settings that differ from what it wants, and
# keeps the value each had before its first change so that uninstall can put it back.

# The power sources ``pmset -g custom`` prints, and the flag that sets each.
PMSET_SOURCE_FLAGS = {"AC Power": "-c", "Battery Power": "-b", "UPS Power": "-u"}
# what a wanted setting may look like: it goes into pmset's argv
_PMSET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_PMSET_VALUE = re.compile(r"^[A-Za-z0-9_./-]+$")


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


def _interfaces(interfaces: Iterable[str]) -> list[str]:
    """``interfaces`` checked to be ``enN`` names."""
    names = list(interfaces or [])
    bad = [n for n in names if not INTERFACE_NAME.match(str(n))]
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
