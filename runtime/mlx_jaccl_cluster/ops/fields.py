"""Checks of one inventory value each (a choice, a path, a port, an address, the API key).

Each takes ``(where, variables, key)`` and returns a :class:`~.schema.Problem` naming the
host, the field and the fix, or None; :mod:`.checks` applies them to the group and the hosts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from .schema import (
    API_KEY_MIN_LENGTH,
    GROUP,
    HOSTNAME,
    MAKE_API_KEY,
    UNIT_NAME,
    WILDCARD_BINDS,
    Problem,
    choices,
    describe,
    is_int,
    setting,
)


def is_ipv4(value: Any) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _set_where(host: str) -> str:
    return f"in group_vars/{GROUP}" if host == GROUP else f"for {host} in the inventory"


# --- single-value checks (each returns a Problem or None) ---------------------------------


def choice(host: str, variables: Mapping[str, Any], key: str, options: tuple[str, ...]) -> Problem | None:
    value = setting(variables, key)
    if value is None:
        return Problem(host, key, "is missing", f"set {key} {_set_where(host)} to one of: {choices(options)}")
    if not isinstance(value, str) or value not in options:
        return Problem(
            host, key, f"is {describe(value)}, which is not a valid choice", f"use one of: {choices(options)}"
        )
    return None


def text(host: str, variables: Mapping[str, Any], key: str, example: str, why: str = "") -> Problem | None:
    """A required non-empty string."""
    value = setting(variables, key)
    because = f" ({why})" if why else ""
    if value is None or value == "":
        return Problem(
            host,
            key,
            f"is {'missing' if value is None else 'empty'}{because}",
            f"set {key}: {example} {_set_where(host)}",
        )
    if not isinstance(value, str):
        return Problem(
            host,
            key,
            f"is {describe(value)}; it must be a string",
            f'write it as a quoted string, e.g. {key}: "{example}"',
        )
    return None


def optional_text(host: str, variables: Mapping[str, Any], key: str, example: str) -> Problem | None:
    """A string that may be empty (the default)."""
    value = setting(variables, key)
    if not isinstance(value, str):
        return Problem(
            host,
            key,
            f"is {describe(value)}; it must be a string",
            f'quote it, e.g. {key}: "{example}", or use "" to leave it unset',
        )
    return None


def abs_path(
    host: str,
    variables: Mapping[str, Any],
    key: str,
    example: str,
    on: str = "the nodes",
    roots: tuple[str, ...] = ("/",),
) -> Problem | None:
    """A required path starting with one of ``roots`` (absolute; a controller path may use ``~``)."""
    problem = text(host, variables, key, example)
    value = setting(variables, key)
    if problem is None and not value.startswith(roots):
        return Problem(
            host, key, f"is {value!r}, a relative path", f"give an absolute path on {on}, e.g. {key}: {example}"
        )
    return problem


def port(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    value, default = setting(variables, key), setting({}, key)
    if not is_int(value):
        quoted = isinstance(value, str) and value.isdigit()
        hint = (
            f"write it without quotes: {key}: {value}"
            if quoted
            else f"set {key} to a whole number, e.g. {key}: {default}"
        )
        return Problem(host, key, f"is {describe(value)}; a port must be a whole number", hint)
    if not 0 < value < 65536:
        return Problem(
            host,
            key,
            f"is {value}, outside the port range 1..65535",
            f"pick a free port in 1..65535, e.g. {key}: {default}",
        )
    return None


def address_error(value: Any) -> str | None:
    """Why ``value`` is not an IPv4 address or hostname, or None when it is one."""
    if not isinstance(value, str):
        return f"is {describe(value)}, not an address"
    if ":" in value:
        return f"is {value!r}; give a bare IPv4 address or hostname (no port; IPv6 is not supported)"
    if re.fullmatch(r"[0-9.]+", value):
        return None if is_ipv4(value) else f"is {value!r}, not a valid IPv4 address"
    return None if HOSTNAME.match(value) else f"is {value!r}, neither an IPv4 address nor a hostname"


def ip_error(value: Any) -> str | None:
    """Why ``value`` is not a literal IPv4 address (what the ranks dial: ``ip:port``), or None."""
    if not isinstance(value, str):
        return f"is {describe(value)}, not an IPv4 address"
    if is_ipv4(value):
        return None
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return f"is {value!r}; give a bare IPv4 address (no port)"
        return f"is the IPv6 address {value!r}; the ranks meet at IPv4 ip:port addresses (MLX hostfile, coordinator)"
    if re.fullmatch(r"[0-9.]+", value):
        return f"is {value!r}, not a valid IPv4 address"
    return f"is {value!r}, a name, not an IPv4 address: a typo here would become a control address"


def host_or_ip_error(value: Any) -> str | None:
    """Why ``value`` is neither an IPv4/IPv6 address nor a hostname (``ansible_host``, a bind address)."""
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value)
            return None
        except ValueError:
            pass
        if ":" in value:
            return f"is {value!r}, not a valid IPv6 address (and a hostname has no ':'; no port here)"
    return address_error(value)


def is_loopback(value: Any) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable only from the machine itself."""
    if value == "localhost":
        return True
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def bool_problem(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    value = setting(variables, key)
    if isinstance(value, bool):
        return None
    return Problem(
        host, key, f"is {describe(value)}; it must be true or false", f"write {key}: true or {key}: false (no quotes)"
    )


def bind_problem(host: str, variables: Mapping[str, Any]) -> Problem | None:
    """cluster_api_host is an address or hostname rank 0 can bind (0.0.0.0 / :: for every interface)."""
    value = setting(variables, "cluster_api_host")
    error = host_or_ip_error(value)
    if error is None:
        return None
    return Problem(
        host,
        "cluster_api_host",
        error,
        "bind 127.0.0.1 (this machine only), rank 0's address on your network, or 0.0.0.0 (every interface)",
    )


def secret_problem(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    """A string of at least API_KEY_MIN_LENGTH characters, or empty. Never echoes the value: it is a secret."""
    value = setting(variables, key)
    make = f"make one with `{MAKE_API_KEY}` and keep it in a vault (ansible-vault encrypt_string VALUE --name {key})"
    if not isinstance(value, str):
        return Problem(
            host,
            key,
            f"is a {type(value).__name__}, not a string (value not shown)",
            f'quote it, or "" for {"no key" if key == "cluster_api_key" else "one generated on the controller"}; {make}',
        )
    if value and len(value) < API_KEY_MIN_LENGTH:
        return Problem(
            host,
            key,
            f"has {len(value)} characters; it needs at least {API_KEY_MIN_LENGTH} (value not shown)",
            make,
        )
    return None


def flag_problem(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    """A boolean, or the words ``-e key=value`` gives (true/false, yes/no)."""
    if as_flag(setting(variables, key)) is not None:
        return None
    return Problem(
        host,
        key,
        f"is {describe(setting(variables, key))}; it must be true or false",
        f"write {key}: true or {key}: false (or -e {key}=true)",
    )


def as_flag(value: Any) -> bool | None:
    """``value`` as a boolean (True, "true", "yes", ...); None when it is not one."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    return words.get(value.strip().lower()) if isinstance(value, str) else None


def name_problem(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    """An optional name that becomes part of a file name on the controller."""
    value = variables.get(key)
    if value is None or (isinstance(value, str) and UNIT_NAME.match(value)):
        return None
    return Problem(
        host,
        key,
        f"is {describe(value)}; it names the cluster's files on the controller",
        f"use letters, digits, '.', '_' or '-', e.g. {key}: my-cluster, or remove it (the inventory folder's name)",
    )


def open_api_problems(group: Mapping[str, Any]) -> list[Problem]:
    """A bind other than loopback serves anyone on the network: it needs a key, or an explicit opt-in."""
    host, key, allow = (setting(group, k) for k in ("cluster_api_host", "cluster_api_key", "cluster_api_allow_open"))
    if not isinstance(host, str) or is_loopback(host) or key != "" or allow is True:
        return []
    reach = "every interface" if host in WILDCARD_BINDS else host
    return [
        Problem(
            GROUP,
            "cluster_api_host",
            f"binds the API to {reach} (reachable from your network) with no cluster_api_key",
            f"set cluster_api_key (make one with `{MAKE_API_KEY}`), or cluster_api_host: 127.0.0.1 to serve this "
            "machine only, or cluster_api_allow_open: true to serve without a key on purpose",
        )
    ]
