"""Validate the ``mlx_cluster`` inventory and render the plan every role uses.

The inventory is the single source of truth. :func:`validate_cluster` checks it before any
host is touched and returns every problem at once, each naming the host, the field and the
fix. :func:`cluster_plan` turns a valid inventory into one fact: the ``mlx.launch`` hostfile
and, per rank, the service's environment, argv and backend files.

``hosts`` maps an inventory hostname to its variables as Ansible's ``hostvars`` give them;
``group`` holds the group variables. Pure standard library: this runs on the controller,
where MLX need not be installed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

GROUP = "mlx_cluster"
BACKENDS = ("jaccl", "jaccl-ring", "ring", "nccl")
PARALLEL_MODES = ("auto", "tensor", "pipeline")  # layout.PARALLEL_CHOICES
MODEL_SOURCES = ("smollm2", "hf", "local")
SERVICE_MANAGERS = ("auto", "launchd", "systemd", "supervisord")
JACCL_BACKENDS = ("jaccl", "jaccl-ring")
COORDINATOR_BACKENDS = ("jaccl", "jaccl-ring", "nccl")

# Backend -> (environment variable, file name under <prefix>/etc/<unit>/) of its rank file.
# jaccl must never get MLX_HOSTFILE: a stray hostfile makes MLX pick ring instead.
BACKEND_FILES = {
    "ring": ("MLX_HOSTFILE", "hostfile.json"),
    "jaccl": ("MLX_IBV_DEVICES", "ibv_devices.json"),
    "jaccl-ring": ("MLX_IBV_DEVICES", "ibv_devices.json"),
}

GROUP_DEFAULTS: dict[str, Any] = {
    "cluster_backend": None,
    "cluster_parallel": "auto",
    "cluster_model_name": None,
    "cluster_model_path": None,
    "cluster_model_source": None,
    "cluster_model_repo": None,
    "cluster_model_local_path": None,
    "cluster_api_host": "0.0.0.0",
    "cluster_api_port": 8080,
    "cluster_api_key": "",
    "cluster_api_allow_open": False,  # serve a non-loopback bind without a key, on purpose
    "cluster_control_port": 32400,
    "cluster_coordinator_port": 32323,
    "cluster_install_prefix": "/opt/mlx-jaccl-cluster",
    "cluster_service_user": "",
    "cluster_service_manager": "auto",
    "cluster_python": "/usr/bin/python3",
    "cluster_runtime_settings": None,  # a mapping of mjc-rank settings, e.g. {max_batch: 16}
}
HOST_DEFAULTS: dict[str, Any] = {
    "cluster_rank": None,
    "ansible_host": None,  # the inventory hostname when unset
    "cluster_ips": (),
    "cluster_rdma": None,
    "cluster_ring_port": 32500,
    "cluster_unit_name": "mlx-jaccl-cluster",
    "cluster_cuda_device": "0",
    "cluster_thunderbolt_ports": None,  # Thunderbolt ports of this Mac; None: the most any Mac has
    "cluster_layers": None,  # pipeline layers of this rank (ops/placement.py); None: by memory
}
INVENTORY_KEYS = (*GROUP_DEFAULTS, *HOST_DEFAULTS)
# Group variables a host may set for itself (paths and users differ between machines, e.g.
# "/Users/{{ ansible_user }}/..."); every other group variable must be the same on all ranks.
NODE_KEYS = (
    "cluster_install_prefix",
    "cluster_model_path",
    "cluster_python",
    "cluster_service_user",
    "cluster_service_manager",
)

RDMA_DEVICE = re.compile(r"^rdma_en[0-9]+$")
UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
WILDCARD_BINDS = ("0.0.0.0", "::", "")
# Thunderbolt 5 ports per Mac (Apple's tech specs): Mac mini M4 Pro 3, MacBook Pro M4 Pro/Max 3,
# Mac Studio M4 Max 4, Mac Studio M3 Ultra 6. One cable per port; a jaccl mesh needs a cable
# from every Mac to every other, so N Macs need N-1 ports on each.
MAX_THUNDERBOLT_PORTS = 6
API_KEY_MIN_LENGTH = 16
MAKE_API_KEY = "openssl rand -hex 24"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the inventory: where it is and what to do about it."""

    host: str  # inventory hostname, or GROUP for a group variable / the group as a whole
    field: str  # variable name, with an index where it helps: cluster_rdma[0]
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.host}: {self.field}: {self.message} — {self.fix}"


# --- small helpers ----------------------------------------------------------------------


def setting(variables: Mapping[str, Any], key: str) -> Any:
    """``variables[key]``, or the schema default when it is missing or null."""
    value = variables.get(key)
    if value is None:
        default = GROUP_DEFAULTS[key] if key in GROUP_DEFAULTS else HOST_DEFAULTS[key]
        return list(default) if isinstance(default, tuple) else default
    return value


def node_setting(group: Mapping[str, Any], variables: Mapping[str, Any], key: str) -> Any:
    """A NODE_KEYS value for one host: its own when set, else the group's."""
    return setting(variables, key) if variables.get(key) is not None else setting(group, key)


def ssh_target(name: str, variables: Mapping[str, Any]) -> str:
    """The machine a rank runs on: ``ansible_host``, else the inventory hostname."""
    return setting(variables, "ansible_host") or name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ipv4(value: Any) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _describe(value: Any) -> str:
    """``value`` as a person reads it in YAML: ``the string '0'``, ``a list``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if _is_int(value) or isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, list):
        return f"a list {json.dumps(value, default=str)}"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"{value!r} ({type(value).__name__})"


def _set_where(host: str) -> str:
    return f"in group_vars/{GROUP}" if host == GROUP else f"for {host} in the inventory"


def _choices(options: Iterable[str]) -> str:
    return ", ".join(options)


# --- single-value checks (each returns a Problem or None) ---------------------------------


def _choice(host: str, variables: Mapping[str, Any], key: str, options: tuple[str, ...]) -> Problem | None:
    value = setting(variables, key)
    if value is None:
        return Problem(host, key, "is missing", f"set {key} {_set_where(host)} to one of: {_choices(options)}")
    if not isinstance(value, str) or value not in options:
        return Problem(
            host, key, f"is {_describe(value)}, which is not a valid choice", f"use one of: {_choices(options)}"
        )
    return None


def _text(host: str, variables: Mapping[str, Any], key: str, example: str, why: str = "") -> Problem | None:
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
            f"is {_describe(value)}; it must be a string",
            f'write it as a quoted string, e.g. {key}: "{example}"',
        )
    return None


def _optional_text(host: str, variables: Mapping[str, Any], key: str, example: str) -> Problem | None:
    """A string that may be empty (the default)."""
    value = setting(variables, key)
    if not isinstance(value, str):
        return Problem(
            host,
            key,
            f"is {_describe(value)}; it must be a string",
            f'quote it, e.g. {key}: "{example}", or use "" to leave it unset',
        )
    return None


def _abs_path(host: str, variables: Mapping[str, Any], key: str, example: str) -> Problem | None:
    problem = _text(host, variables, key, example)
    value = setting(variables, key)
    if problem is None and not value.startswith("/"):
        return Problem(
            host, key, f"is {value!r}, a relative path", f"give an absolute path on the nodes, e.g. {key}: {example}"
        )
    return problem


def _port(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    value, default = setting(variables, key), setting({}, key)
    if not _is_int(value):
        quoted = isinstance(value, str) and value.isdigit()
        hint = (
            f"write it without quotes: {key}: {value}"
            if quoted
            else f"set {key} to a whole number, e.g. {key}: {default}"
        )
        return Problem(host, key, f"is {_describe(value)}; a port must be a whole number", hint)
    if not 0 < value < 65536:
        return Problem(
            host,
            key,
            f"is {value}, outside the port range 1..65535",
            f"pick a free port in 1..65535, e.g. {key}: {default}",
        )
    return None


def _address_error(value: Any) -> str | None:
    """Why ``value`` is not an IPv4 address or hostname, or None when it is one."""
    if not isinstance(value, str):
        return f"is {_describe(value)}, not an address"
    if ":" in value:
        return f"is {value!r}; give a bare IPv4 address or hostname (no port; IPv6 is not supported)"
    if re.fullmatch(r"[0-9.]+", value):
        return None if _is_ipv4(value) else f"is {value!r}, not a valid IPv4 address"
    return None if HOSTNAME.match(value) else f"is {value!r}, neither an IPv4 address nor a hostname"


def _ip_error(value: Any) -> str | None:
    """Why ``value`` is not a literal IPv4 address (what the ranks dial: ``ip:port``), or None."""
    if not isinstance(value, str):
        return f"is {_describe(value)}, not an IPv4 address"
    if _is_ipv4(value):
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


def _host_or_ip_error(value: Any) -> str | None:
    """Why ``value`` is neither an IPv4/IPv6 address nor a hostname (``ansible_host``, a bind address)."""
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value)
            return None
        except ValueError:
            pass
        if ":" in value:
            return f"is {value!r}, not a valid IPv6 address (and a hostname has no ':'; no port here)"
    return _address_error(value)


def _is_loopback(value: Any) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable only from the machine itself."""
    if value == "localhost":
        return True
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def _bool_problem(host: str, variables: Mapping[str, Any], key: str) -> Problem | None:
    value = setting(variables, key)
    if isinstance(value, bool):
        return None
    return Problem(
        host, key, f"is {_describe(value)}; it must be true or false", f"write {key}: true or {key}: false (no quotes)"
    )


def _bind_problem(host: str, variables: Mapping[str, Any]) -> Problem | None:
    """cluster_api_host is an address or hostname rank 0 can bind (0.0.0.0 / :: for every interface)."""
    value = setting(variables, "cluster_api_host")
    error = _host_or_ip_error(value)
    if error is None:
        return None
    return Problem(
        host,
        "cluster_api_host",
        error,
        "bind 127.0.0.1 (this machine only), rank 0's address on your network, or 0.0.0.0 (every interface)",
    )


def _api_key_problem(host: str, variables: Mapping[str, Any]) -> Problem | None:
    """A string of at least API_KEY_MIN_LENGTH characters, or empty. Never echoes the value: it is a secret."""
    value = setting(variables, "cluster_api_key")
    make = f"make one with `{MAKE_API_KEY}` and keep it in a vault (ansible-vault encrypt_string KEY --name cluster_api_key)"
    if not isinstance(value, str):
        return Problem(
            host,
            "cluster_api_key",
            f"is a {type(value).__name__}, not a string (value not shown)",
            f'quote it, or "" for no key; {make}',
        )
    if value and len(value) < API_KEY_MIN_LENGTH:
        return Problem(
            host,
            "cluster_api_key",
            f"has {len(value)} characters; a key needs at least {API_KEY_MIN_LENGTH} (value not shown)",
            make,
        )
    return None


def _open_api_problems(group: Mapping[str, Any]) -> list[Problem]:
    """A bind other than loopback serves anyone on the network: it needs a key, or an explicit opt-in."""
    host, key, allow = (setting(group, k) for k in ("cluster_api_host", "cluster_api_key", "cluster_api_allow_open"))
    if not isinstance(host, str) or _is_loopback(host) or key != "" or allow is True:
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


# --- group variables and the model ---------------------------------------------------------


MODEL_PATH_EXAMPLE = "/opt/mlx-jaccl-cluster/models/SmolLM2-135M-Instruct"
# Group variable -> its check, called as check(where, variables, key).
GROUP_CHECKS: dict[str, Callable[[str, Mapping[str, Any], str], Problem | None]] = {
    "cluster_backend": partial(_choice, options=BACKENDS),
    "cluster_parallel": partial(_choice, options=PARALLEL_MODES),
    "cluster_model_source": partial(_choice, options=MODEL_SOURCES),
    "cluster_service_manager": partial(_choice, options=SERVICE_MANAGERS),
    "cluster_model_name": partial(_text, example="SmolLM2-135M-Instruct"),
    "cluster_model_path": partial(_abs_path, example=MODEL_PATH_EXAMPLE),
    "cluster_install_prefix": partial(_abs_path, example=GROUP_DEFAULTS["cluster_install_prefix"]),
    "cluster_python": partial(_abs_path, example=GROUP_DEFAULTS["cluster_python"]),
    "cluster_api_host": lambda host, variables, key: (
        _text(host, variables, key, "127.0.0.1") or _bind_problem(host, variables)
    ),
    "cluster_api_key": lambda host, variables, key: _api_key_problem(host, variables),
    "cluster_api_allow_open": lambda host, variables, key: _bool_problem(host, variables, key),
    "cluster_service_user": partial(_optional_text, example="admin"),
    "cluster_api_port": _port,
    "cluster_control_port": _port,
    "cluster_coordinator_port": _port,
}


CLUSTER_SECRET_FILE = "cluster-secret"  # in each rank's etc_dir

# Runtime settings the inventory decides through its own variables (cluster_backend, the
# rank order, cluster_api_port...): cluster_runtime_settings may not set them.
RUNTIME_OWNED = (
    "rank",
    "world_size",
    "backend",
    "parallel",
    "control",
    "peer_ips",
    "model",
    "model_id",
    "api_host",
    "api_port",
    "api_key",
    "cluster_secret",
    "cluster_secret_file",
    "pipeline_split",
)


def runtime_settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """``cluster_runtime_settings`` as a plain dict (empty when unset)."""
    value = group.get("cluster_runtime_settings")
    return dict(value) if isinstance(value, Mapping) else {}


def _runtime_settings_problems(group: Mapping[str, Any]) -> list[Problem]:
    """Each entry names a tunable ``mjc-rank`` setting and holds a value it accepts."""
    key = "cluster_runtime_settings"
    value = group.get(key)
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [
            Problem(
                GROUP,
                key,
                f"is {_describe(value)}; it must be a mapping",
                f"write it as a mapping of mjc-rank settings, e.g. {key}: {{max_batch: 16}}",
            )
        ]
    # pydantic, not MLX: the controller has the runtime package installed
    from pydantic import TypeAdapter, ValidationError

    from ..settings import Settings

    tunable = sorted(k for k in Settings.model_fields if k not in RUNTIME_OWNED)
    found = []
    for name, item in value.items():
        field_name = f"{key}.{name}"
        info = Settings.model_fields.get(str(name))
        if info is None or name in RUNTIME_OWNED:
            why = "is set by the inventory's own variables" if name in RUNTIME_OWNED else "is not an mjc-rank setting"
            found.append(
                Problem(GROUP, field_name, why, f"remove it; settable here: {_choices(tunable)} (mjc-rank --help)")
            )
            continue
        try:
            kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            TypeAdapter(kind).validate_python(item, strict=True)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].lower()
            found.append(
                Problem(
                    GROUP,
                    field_name,
                    f"is {_describe(item)}: {reason}",
                    f"give a value that fits: {info.description or name}",
                )
            )
    return found


def _group_problems(group: Mapping[str, Any]) -> list[Problem]:
    """Types, choices and required keys of the group variables."""
    found = [check(GROUP, group, key) for key, check in GROUP_CHECKS.items()]
    found += _runtime_settings_problems(group) + _open_api_problems(group)
    source = setting(group, "cluster_model_source")
    if source == "hf":
        found.append(
            _text(
                GROUP, group, "cluster_model_repo", "HuggingFaceTB/SmolLM2-135M-Instruct", "cluster_model_source is hf"
            )
        )
    if source == "local":
        found.append(
            _text(
                GROUP,
                group,
                "cluster_model_local_path",
                "~/models/SmolLM2-135M-Instruct",
                "cluster_model_source is local",
            )
        )
    return [p for p in found if p]


def _differs(variables: Mapping[str, Any], group: Mapping[str, Any], key: str) -> bool:
    """Whether a host sets group variable ``key`` to something other than the group's value."""
    return variables.get(key) is not None and setting(variables, key) != setting(group, key)


def _groups_of(export: Mapping[str, Any], host: str) -> list[str]:
    """Groups ``host`` belongs to in ``ansible-inventory --list --export`` output, directly or through a child group."""
    groups = {name: g for name, g in export.items() if name != "_meta" and isinstance(g, Mapping)}
    member: dict[str, bool] = {}

    def has(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name not in member:
            g = groups.get(name, {})
            member[name] = (
                host in (g.get("hosts") or [])
                or name == "all"
                or any(has(child, seen | {name}) for child in (g.get("children") or []) if child not in seen)
            )
        return member[name]

    return [name for name in groups if has(name)]


def value_sources(export: Mapping[str, Any] | None, host: str, key: str, value: Any) -> list[str]:
    """Where the inventory sets ``key`` to ``value`` for ``host``: ``host NAME`` and/or ``group NAME``.

    ``export`` is ``ansible-inventory --list --export`` output (group variables stay with their
    groups there); empty when it is unknown or nothing there sets it.
    """
    if not isinstance(export, Mapping):
        return []
    own = (export.get("_meta") or {}).get("hostvars", {}).get(host) or {}
    found = [f"host {host}"] if own.get(key, object()) == value else []
    for name in _groups_of(export, host):
        if (export[name].get("vars") or {}).get(key, object()) == value:
            found.append(f"group {name}")
    return found


def _override_problems(
    hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any], sources: Mapping[str, Any] | None = None
) -> list[Problem]:
    """Group variables (other than NODE_KEYS) set differently on one host: every rank must agree on them.

    The message names what sets the odd value (the host itself or another group it belongs
    to) when ``sources`` (``ansible-inventory --list --export``) tells; else the host.
    """
    found = []
    for name, variables in hosts.items():
        for key in GROUP_DEFAULTS:
            if key in NODE_KEYS or not _differs(variables, group, key):
                continue
            value = setting(variables, key)
            secret = key == "cluster_api_key"
            mine = "a different value (not shown)" if secret else _describe(value)
            theirs = "" if secret else f" but {_describe(setting(group, key))} for the group"
            where = value_sources(sources, name, key, value) or [f"host {name}"]
            blamed = " and ".join(where)
            by = "" if where == [f"host {name}"] else f" (set by {blamed})"
            found.append(
                Problem(
                    name,
                    key,
                    f"is {mine} on this host{by}{theirs}",
                    f"set {key} once in group_vars/{GROUP} and remove it from {blamed}",
                )
            )
    return found


def group_overrides(hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any]) -> list[str]:
    """``host: key`` for each group variable a host sees differently (cheap; preflight then asks
    ``ansible-inventory`` which group sets it, only when there is one)."""
    return [f"{p.host}: {p.field}" for p in _override_problems(hosts, group)]


def _node_key_problems(name: str, variables: Mapping[str, Any], group: Mapping[str, Any]) -> list[Problem]:
    """A host's own values of NODE_KEYS pass the same checks as the group's."""
    found = [GROUP_CHECKS[key](name, variables, key) for key in NODE_KEYS if _differs(variables, group, key)]
    return [p for p in found if p]


def _model_problems(group: Mapping[str, Any], world_size: int, model_config: Mapping[str, Any] | None) -> list[Problem]:
    """Whether the model can be split over ``world_size`` ranks the way cluster_parallel says
    (``layout.choose``, the function every rank runs): every model with a layer stack
    pipelines (mlx-lm's own split or the generic one), tensor needs shard() and heads that
    divide. The one place for model-vs-layout rules on the controller: extend it."""
    parallel = setting(group, "cluster_parallel")
    if parallel not in PARALLEL_MODES:
        return []  # reported by the choice check
    if parallel == "pipeline" and world_size < 2:
        return [
            Problem(
                GROUP,
                "cluster_parallel",
                f"is pipeline but the group has only {world_size} host",
                "add a second host or set cluster_parallel: auto",
            )
        ]
    if not model_config:
        return []
    from ..layout import LayoutError, choose, num_layers

    try:
        layout = choose(dict(model_config), world_size, parallel)
    except LayoutError as exc:
        return [Problem(GROUP, "cluster_parallel", f"is {parallel}: {exc}", "set cluster_parallel: auto")]
    layers = num_layers(dict(model_config))
    if layout.parallel == "pipeline" and layers is not None and layers < world_size:
        return [
            Problem(
                GROUP,
                "cluster_parallel",
                f"is pipeline over {world_size} ranks but the model has only {layers} layers",
                f"use at most {layers} hosts",
            )
        ]
    return []


# --- ranks ----------------------------------------------------------------------------------


def _rank_problems(hosts: Mapping[str, Mapping[str, Any]]) -> list[Problem]:
    """Every host has an int rank; together they are 0..N-1, each once."""
    n = len(hosts)
    if n == 0:
        return [
            Problem(
                GROUP,
                "hosts",
                f"the group {GROUP} has no hosts",
                f"add at least one host to {GROUP} with cluster_rank: 0",
            )
        ]
    ranks = {name: variables.get("cluster_rank") for name, variables in hosts.items()}
    taken = {r for r in ranks.values() if _is_int(r) and 0 <= r < n}
    free = ", ".join(str(r) for r in range(n) if r not in taken) or "none"
    renumber = f"give every host its own cluster_rank in 0..{n - 1} (free: {free})"
    found: list[Problem] = []
    owner: dict[int, str] = {}
    for name, rank in ranks.items():
        if rank is None:
            found.append(Problem(name, "cluster_rank", "is missing", renumber))
        elif not _is_int(rank):
            fix = (
                f"write it without quotes: cluster_rank: {rank}"
                if isinstance(rank, str) and rank.isdigit()
                else renumber
            )
            found.append(Problem(name, "cluster_rank", f"is {_describe(rank)}; a rank must be a whole number", fix))
        elif not 0 <= rank < n:
            found.append(
                Problem(
                    name, "cluster_rank", f"is {rank} but the group has {n} hosts, so ranks run 0..{n - 1}", renumber
                )
            )
        elif rank in owner:
            found.append(Problem(name, "cluster_rank", f"is {rank}, which {owner[rank]} already has", renumber))
        else:
            owner[rank] = name
    return found


def ordered_hosts(hosts: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(hostname, vars)`` in rank order; call only on hosts whose ranks are valid."""
    return sorted(hosts.items(), key=lambda item: item[1]["cluster_rank"])


# --- per-host checks --------------------------------------------------------------------------


def _ips_problems(name: str, variables: Mapping[str, Any]) -> list[Problem]:
    """cluster_ips is a list of IPv4 addresses / hostnames."""
    ips = setting(variables, "cluster_ips")
    if isinstance(ips, str):
        return [
            Problem(
                name,
                "cluster_ips",
                f"is {_describe(ips)}; it must be a list",
                f"write it as a list: cluster_ips: [{ips}]",
            )
        ]
    if not isinstance(ips, list):
        return [
            Problem(
                name,
                "cluster_ips",
                f"is {_describe(ips)}; it must be a list of addresses",
                "write e.g. cluster_ips: [192.168.1.14]",
            )
        ]
    return [
        Problem(
            name, f"cluster_ips[{i}]", error, "use this host's IPv4 address on the cluster network, e.g. 192.168.1.14"
        )
        for i, ip in enumerate(ips)
        if (error := _ip_error(ip))
    ]


def _why_address(rank: int, world_size: int, backend: str | None) -> str | None:
    """Why this rank needs at least one entry in cluster_ips (None: it does not)."""
    if rank == 0:
        return "its first IP is the coordinator and control address the ranks meet at"
    if backend == "ring":
        return "its first IP is its ring listen address"
    if world_size > 1:
        return "rank 0's control channel admits only each rank's first IP (MJC_PEER_IPS)"
    return None


def _address_needed_problems(ordered: list[tuple[str, Mapping[str, Any]]], backend: str | None) -> list[Problem]:
    """Ranks that need an address have one; peers' first IPs are literal IPv4 addresses."""
    found: list[Problem] = []
    for rank, (name, variables) in enumerate(ordered):
        ips = setting(variables, "cluster_ips")
        if not isinstance(ips, list):
            continue  # reported by _ips_problems
        why = _why_address(rank, len(ordered), backend)
        if not ips and why:
            found.append(
                Problem(
                    name,
                    "cluster_ips",
                    f"is empty, but rank {rank} needs an address: {why}",
                    "list this host's IPv4 address on the cluster network first, e.g. cluster_ips: [192.168.1.14]",
                )
            )
        elif ips and rank > 0 and isinstance(ips[0], str) and not _address_error(ips[0]) and not _is_ipv4(ips[0]):
            found.append(
                Problem(
                    name,
                    "cluster_ips[0]",
                    f"is the hostname {ips[0]!r}, but rank 0's control channel admits peers by the IP they connect from",
                    "put this host's IPv4 address on the cluster network first",
                )
            )
    return found


def _host_problems(name: str, variables: Mapping[str, Any], backend: str | None) -> list[Problem]:
    """Checks of one host's own variables that need no other host."""
    found = [
        _ansible_host_problem(name, variables) if "ansible_host" in variables else None,
        _thunderbolt_ports_problem(name, variables),
        _unit_name_problem(name, variables),
        _port(name, variables, "cluster_ring_port") if backend == "ring" else None,
        _cuda_device_problem(name, variables) if backend == "nccl" else None,
        _layers_problem(name, variables),
    ]
    return [p for p in found if p] + _ips_problems(name, variables)


def _ansible_host_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    problem = _text(name, variables, "ansible_host", "192.168.1.14")
    error = None if problem else _host_or_ip_error(setting(variables, "ansible_host"))
    if error:
        return Problem(
            name,
            "ansible_host",
            error,
            "give the address or hostname the controller reaches this host at over SSH, "
            "e.g. ansible_host: 192.168.1.14 or ansible_host: mac1.local",
        )
    return problem


def _thunderbolt_ports_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = variables.get("cluster_thunderbolt_ports")
    if value is None or (_is_int(value) and 1 <= value <= MAX_THUNDERBOLT_PORTS):
        return None
    return Problem(
        name,
        "cluster_thunderbolt_ports",
        f"is {_describe(value)}; it is how many Thunderbolt ports this Mac has",
        f"give a whole number 1..{MAX_THUNDERBOLT_PORTS} (Mac mini M4 Pro: 3, Mac Studio M4 Max: 4, "
        "M3 Ultra: 6), or remove it",
    )


def _layers_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = variables.get("cluster_layers")
    if value is None or (_is_int(value) and value > 0):
        return None
    return Problem(
        name,
        "cluster_layers",
        f"is {_describe(value)}; it must be a positive integer",
        "give this rank's number of pipeline layers, e.g. cluster_layers: 10, or remove it (split by memory)",
    )


def _unit_name_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = setting(variables, "cluster_unit_name")
    if not isinstance(value, str) or not UNIT_NAME.match(value):
        return Problem(
            name,
            "cluster_unit_name",
            f"is {_describe(value)}; it names the service and its folder",
            "use letters, digits, '.', '_', '-' or '@' (starting with a letter or digit), e.g. mlx-jaccl-cluster-rank1",
        )
    return None


def _cuda_device_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = setting(variables, "cluster_cuda_device")
    if (_is_int(value) and value >= 0) or (isinstance(value, str) and value.strip()):
        return None
    return Problem(
        name,
        "cluster_cuda_device",
        f"is {_describe(value)}; it becomes CUDA_VISIBLE_DEVICES",
        "give the GPU index (or UUID) this rank uses, e.g. cluster_cuda_device: 0",
    )


# --- things that must be unique per machine -----------------------------------------------------


@dataclass(frozen=True)
class _Claim:
    """Something one rank takes on its machine: a port, a unit name, a GPU."""

    machine: str
    value: Any
    host: str
    field: str
    label: str


def _clashes(claims: Iterable[_Claim]) -> list[tuple[_Claim, _Claim]]:
    """``(later, earlier)`` for every claim whose value is already taken on its machine."""
    first: dict[tuple[str, Any], _Claim] = {}
    found = []
    for claim in claims:
        key = (claim.machine, claim.value)
        if key in first:
            found.append((claim, first[key]))
        else:
            first[key] = claim
    return found


def _port_claims(ordered: list[tuple[str, Mapping[str, Any]]], group: Mapping[str, Any], backend: str) -> list[_Claim]:
    """Every listening port, on the machine it listens on (group ports first)."""
    rank0 = ssh_target(*ordered[0])
    wanted = [("cluster_api_port", "rank 0's API"), ("cluster_control_port", "rank 0's control channel")]
    if backend in COORDINATOR_BACKENDS:
        wanted.append(("cluster_coordinator_port", "the NCCL port" if backend == "nccl" else "the jaccl coordinator"))
    claims = [_Claim(rank0, setting(group, key), GROUP, key, label) for key, label in wanted]
    if backend == "ring":
        claims += [
            _Claim(
                ssh_target(name, v),
                setting(v, "cluster_ring_port"),
                name,
                "cluster_ring_port",
                f"rank {rank}'s ring listener",
            )
            for rank, (name, v) in enumerate(ordered)
        ]
    return [c for c in claims if _is_int(c.value) and 0 < c.value < 65536]


def _free_port(start: int, used: set[int]) -> int:
    return next((p for p in range(start + 1, 65536) if p not in used), 1024)


def _port_clash_problems(
    ordered: list[tuple[str, Mapping[str, Any]]], group: Mapping[str, Any], backend: str
) -> list[Problem]:
    claims = _port_claims(ordered, group, backend)
    used = {(c.machine, c.value) for c in claims}
    found = []
    for later, earlier in _clashes(claims):
        free = _free_port(later.value, {port for machine, port in used if machine == later.machine})
        used.add((later.machine, free))  # two clashing ranks get two different suggestions
        found.append(
            Problem(
                later.host,
                later.field,
                f"{later.value} is also {earlier.label} ({earlier.field} of {earlier.host}) on {later.machine}",
                f"give every listener on {later.machine} its own port, e.g. {later.field}: {free}",
            )
        )
    return found


def _shared_machine_problems(hosts: Mapping[str, Mapping[str, Any]], backend: str | None) -> list[Problem]:
    """Ranks on one machine need their own unit name (and, for nccl, their own GPU)."""
    keys = ["cluster_unit_name"] + (["cluster_cuda_device"] if backend == "nccl" else [])
    found = []
    for key in keys:
        claims = [_Claim(ssh_target(name, v), str(setting(v, key)), name, key, "") for name, v in hosts.items()]
        for later, earlier in _clashes(claims):
            rank = hosts[later.host].get("cluster_rank")
            suggestion = (
                f"{HOST_DEFAULTS[key]}-rank{rank if _is_int(rank) else 1}"
                if key == "cluster_unit_name"
                else "another GPU index"
            )
            found.append(
                Problem(
                    later.host,
                    key,
                    f"is {later.value!r}, the same as {earlier.host} on the same machine ({later.machine})",
                    f"give every rank on {later.machine} its own {key}, e.g. {suggestion}",
                )
            )
    return found


# --- addresses across hosts ---------------------------------------------------------------------


def _address_clash_problems(ordered: list[tuple[str, Mapping[str, Any]]], backend: str | None) -> list[Problem]:
    """Each cluster IP belongs to one machine; loopback only where every rank shares one machine;
    one rank per Mac for jaccl (a Mac has no cable to itself)."""
    machines = {ssh_target(name, v) for name, v in ordered}
    owner: dict[str, tuple[str, str]] = {}
    found: list[Problem] = []
    for name, variables in ordered:
        machine = ssh_target(name, variables)
        ips = setting(variables, "cluster_ips")
        for i, ip in enumerate(ips if isinstance(ips, list) else []):
            if not isinstance(ip, str) or _ip_error(ip):
                continue
            if _is_loopback(ip) and len(machines) > 1:
                found.append(
                    Problem(
                        name,
                        f"cluster_ips[{i}]",
                        f"is {ip}, which reaches only the machine itself, "
                        f"but the ranks run on {len(machines)} machines ({_choices(sorted(machines))})",
                        "use this host's address on the network the ranks share, e.g. 192.168.1.14",
                    )
                )
                continue
            earlier = owner.setdefault(ip, (name, machine))
            if earlier[1] != machine:
                found.append(
                    Problem(
                        name,
                        f"cluster_ips[{i}]",
                        f"is {ip}, which {earlier[0]} (on {earlier[1]}) also lists; "
                        f"two machines cannot have one address (this host is reached at {machine})",
                        f"give {name} its own address; if both ranks run on one machine, give them the same "
                        f"ansible_host",
                    )
                )
    if backend in JACCL_BACKENDS:
        first: dict[str, str] = {}
        for name, variables in ordered:
            machine = ssh_target(name, variables)
            if first.setdefault(machine, name) != name:
                found.append(
                    Problem(
                        name,
                        "ansible_host",
                        f"is {machine}, the same Mac as {first[machine]}; backend {backend} "
                        "runs one rank per Mac (ranks talk over the Thunderbolt cables between Macs)",
                        "give each rank its own Mac (ansible_host), or use cluster_backend: ring for several "
                        "ranks on one machine",
                    )
                )
    if backend == "ring":
        claims = [
            _Claim(
                str(setting(v, "cluster_ips")[0]),
                setting(v, "cluster_ring_port"),
                name,
                "cluster_ring_port",
                f"rank {rank}'s ring listener",
            )
            for rank, (name, v) in enumerate(ordered)
            if isinstance(setting(v, "cluster_ips"), list)
            and setting(v, "cluster_ips")
            and _is_int(setting(v, "cluster_ring_port"))
        ]
        machine_of = {name: ssh_target(name, v) for name, v in ordered}
        for later, earlier in _clashes(claims):
            if machine_of[later.host] == machine_of[earlier.host]:
                continue  # the same machine: _port_clash_problems reports it
            found.append(
                Problem(
                    later.host,
                    "cluster_ring_port",
                    f"{later.value} on {later.machine} is also {earlier.label} ({earlier.host})",
                    "give every rank on one address its own "
                    f"cluster_ring_port, e.g. cluster_ring_port: {later.value + 1}",
                )
            )
    return found


# --- the RDMA matrix (jaccl, jaccl-ring) --------------------------------------------------------


def _cables(cell: Any) -> tuple[str, ...]:
    """Device names of one matrix cell (empty for null); ValueError says what is wrong."""
    if cell is None:
        return ()
    names = [cell] if isinstance(cell, str) else cell
    if not isinstance(names, list):
        raise ValueError(f"is {_describe(cell)}; a cell is a device name, a list of names (one per cable) or null")
    if not names:
        raise ValueError("is an empty list; write null where there is no cable")
    bad = next((n for n in names if not (isinstance(n, str) and RDMA_DEVICE.match(n))), None)
    if bad is not None:
        raise ValueError(f"names {bad!r}, which is not an RDMA device name like rdma_en4")
    if len(set(names)) != len(names):
        raise ValueError("names the same device twice")
    return tuple(names)


def _needs_cable(i: int, j: int, n: int, backend: str) -> bool:
    """Whether ranks i and j must be cabled: every pair for the mesh, neighbours for jaccl-ring."""
    if i == j:
        return False
    return backend == "jaccl" or (j - i) % n in (1, n - 1)


def _example_row(rank: int, n: int, backend: str) -> str:
    devices = iter(range(2, 2 + n))
    return json.dumps([f"rdma_en{next(devices)}" if _needs_cable(rank, j, n, backend) else None for j in range(n)])


def _show_cell(cables: tuple[str, ...]) -> str:
    return cables[0] if len(cables) == 1 else json.dumps(list(cables))


def _rdma_row(
    name: str, rank: int, raw: Any, n: int, backend: str
) -> tuple[list[Problem], list[tuple[str, ...] | None] | None]:
    """Problems of one host's row, and its cells as cable tuples (None for a bad cell / bad row)."""
    example = f"e.g. cluster_rdma: {_example_row(rank, n, backend)} (ibv_devices on {name} lists its devices)"
    if raw is None:
        return [
            Problem(
                name, "cluster_rdma", f"is missing; backend {backend} needs one cell per rank", f"set it, {example}"
            )
        ], None
    if not isinstance(raw, list):
        return [
            Problem(
                name,
                "cluster_rdma",
                f"is {_describe(raw)}; it must be a list with one cell per rank",
                f"write it as a list, {example}",
            )
        ], None
    if len(raw) != n:
        return [
            Problem(
                name,
                "cluster_rdma",
                f"has {len(raw)} cells but the group has {n} ranks",
                f"give one cell per rank in rank order, null for itself, {example}",
            )
        ], None
    found: list[Problem] = []
    cells: list[tuple[str, ...] | None] = []
    for j, cell in enumerate(raw):
        try:
            cells.append(_cables(cell))
        except ValueError as exc:
            found.append(
                Problem(
                    name, f"cluster_rdma[{j}]", str(exc), f"name the device of the port cabled to rank {j}, {example}"
                )
            )
            cells.append(None)
    if cells[rank]:
        found.append(
            Problem(
                name,
                f"cluster_rdma[{rank}]",
                f"names {_show_cell(cells[rank])} but this is the host's own rank (the diagonal)",
                f"set cluster_rdma[{rank}] to null: a host has no cable to itself",
            )
        )
    seen: dict[str, int] = {}
    peers = [(j, cell) for j, cell in enumerate(cells) if j != rank and cell]
    for j, cell in peers:
        for device in cell:
            if device in seen:
                found.append(
                    Problem(
                        name,
                        f"cluster_rdma[{j}]",
                        f"names {device}, which cluster_rdma[{seen[device]}] already uses",
                        "a port is cabled to one peer: give each peer the device of its own cable "
                        "(ibv_devinfo shows which ports are PORT_ACTIVE)",
                    )
                )
            seen.setdefault(device, j)
    return found, cells


def _pair_problem(
    ordered: list[tuple[str, Mapping[str, Any]]],
    i: int,
    j: int,
    mine: tuple[str, ...],
    theirs: tuple[str, ...],
    backend: str,
) -> Problem | None:
    """Host ``i``'s cell for ``j`` (``mine``) against host ``j``'s cell for ``i`` (``theirs``)."""
    name, peer = ordered[i][0], ordered[j][0]
    field = f"cluster_rdma[{j}]"
    if not mine and theirs:
        return Problem(
            name,
            field,
            f"is null but {peer} names {_show_cell(theirs)} for this cable",
            f"set {field} on {name} to the device of its end of the cable (e.g. {_show_cell(theirs)})",
        )
    if not mine and _needs_cable(i, j, len(ordered), backend):
        need = (
            "every pair of ranks needs a cable for jaccl (mesh)"
            if backend == "jaccl"
            else f"ranks {i} and {j} are neighbours on the jaccl-ring"
        )
        return Problem(
            name,
            field,
            f"is null, but {need}",
            f"cable {name} to {peer} and set {field} on {name} to the device of that port (ibv_devices lists them)",
        )
    if mine and theirs and len(mine) != len(theirs) and i > j:
        return Problem(
            name,
            field,
            f"names {len(mine)} cable(s) but {peer} names {len(theirs)} for the same link",
            "list one device per cable, the same number at both ends",
        )
    return None


def _thunderbolt_problems(
    ordered: list[tuple[str, Mapping[str, Any]]], rows: list[list[tuple[str, ...] | None] | None], backend: str
) -> list[Problem]:
    """A Mac has so many Thunderbolt ports: one cable each. A mesh needs N-1 per Mac."""
    n = len(ordered)
    found: list[Problem] = []
    mesh_reported = False
    for (name, variables), row in zip(ordered, rows):
        stated = variables.get("cluster_thunderbolt_ports")
        ports = stated if _is_int(stated) and 1 <= stated <= MAX_THUNDERBOLT_PORTS else MAX_THUNDERBOLT_PORTS
        which = f"{name} has {ports}" if stated == ports else f"a Mac has at most {ports} (Mac Studio M3 Ultra)"
        if backend == "jaccl" and n - 1 > ports and not mesh_reported:
            mesh_reported = True
            found.append(
                Problem(
                    name,
                    "cluster_backend",
                    f"is jaccl, a mesh: {n} Macs need a cable from each Mac to each of "
                    f"the other {n - 1}, but {which} Thunderbolt ports",
                    f"set cluster_backend: jaccl-ring (2 cables per Mac), or use at most {ports + 1} Macs",
                )
            )
        cables = sum(len(cell) for cell in row or [] if cell)
        if row is not None and cables > ports:
            found.append(
                Problem(
                    name,
                    "cluster_rdma",
                    f"names {cables} cables, but {which} Thunderbolt ports",
                    "list one device per cable actually plugged in (ibv_devinfo shows which are PORT_ACTIVE)",
                )
            )
    return found


def _rdma_problems(ordered: list[tuple[str, Mapping[str, Any]]], backend: str) -> list[Problem]:
    """The device matrix is square, null on the diagonal, complete enough and agreed at both ends."""
    n = len(ordered)
    found: list[Problem] = []
    rows: list[list[tuple[str, ...] | None] | None] = []
    for rank, (name, variables) in enumerate(ordered):
        problems, cells = _rdma_row(name, rank, variables.get("cluster_rdma"), n, backend)
        found += problems
        rows.append(cells)
    found += _thunderbolt_problems(ordered, rows, backend)
    for i, row in enumerate(rows):
        for j in range(n):
            other = rows[j]
            if i == j or row is None or other is None or row[j] is None or other[i] is None:
                continue
            problem = _pair_problem(ordered, i, j, row[j], other[i], backend)
            if problem:
                found.append(problem)
    return found


# --- validate ---------------------------------------------------------------------------------


def validate_cluster(
    hosts: Mapping[str, Mapping[str, Any]],
    group: Mapping[str, Any],
    model_config: Mapping[str, Any] | None = None,
    sources: Mapping[str, Any] | None = None,
) -> list[Problem]:
    """Every problem of the inventory (empty when it is good).

    ``hosts``: inventory hostname -> its variables; ``group``: the group variables;
    ``model_config``: the model's config.json when known; ``sources``: ``ansible-inventory --list
    --export`` output, to name the group that sets a value a host must not differ in. Checks that need the rank order (addresses
    per rank, the RDMA matrix, port clashes) run once every rank is valid.
    """
    backend = setting(group, "cluster_backend")
    backend = backend if backend in BACKENDS else None
    found = _group_problems(group) + _override_problems(hosts, group, sources) + _rank_problems(hosts)
    rank_order_known = not any(p.field in ("cluster_rank", "hosts") for p in found)
    for name, variables in hosts.items():
        found += _host_problems(name, variables, backend) + _node_key_problems(name, variables, group)
    found += _shared_machine_problems(hosts, backend)
    found += _model_problems(group, len(hosts), model_config)
    if rank_order_known:
        ordered = ordered_hosts(hosts)
        found += _address_needed_problems(ordered, backend) + _address_clash_problems(ordered, backend)
        if backend:
            found += _port_clash_problems(ordered, group, backend)
        if backend in JACCL_BACKENDS:
            found += _rdma_problems(ordered, backend)
    return found


# --- plan -----------------------------------------------------------------------------------


def _plain_cell(cell: Any) -> Any:
    return list(cell) if isinstance(cell, list) else cell


def _rdma_matrix(ordered: list[tuple[str, Mapping[str, Any]]]) -> list[list[Any]]:
    return [[_plain_cell(cell) for cell in v["cluster_rdma"]] for _, v in ordered]


def _first_ips(ordered: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    return [str(setting(v, "cluster_ips")[0]) for _, v in ordered]


def _backend_file(backend: str, ordered: list[tuple[str, Mapping[str, Any]]]) -> Any:
    """Content of the backend's rank file (same on every rank); None when it has none."""
    if backend == "ring":
        return [[f"{ip}:{setting(v, 'cluster_ring_port')}"] for ip, (_, v) in zip(_first_ips(ordered), ordered)]
    if backend in JACCL_BACKENDS:
        return _rdma_matrix(ordered)
    return None


def launch_hostfile(backend: str, ordered: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The ``mlx.launch`` hostfile (object form) for this cluster."""
    rdma = _rdma_matrix(ordered) if backend in JACCL_BACKENDS else [[] for _ in ordered]
    return {
        "backend": "jaccl" if backend in JACCL_BACKENDS else backend,
        "envs": ["MLX_JACCL_RING=1"] if backend == "jaccl-ring" else [],
        "hosts": [
            {"ssh": ssh_target(name, v), "ips": [str(ip) for ip in setting(v, "cluster_ips")], "rdma": row}
            for (name, v), row in zip(ordered, rdma)
        ],
    }


def _common_env(group: Mapping[str, Any], ordered: list[tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
    """Environment every rank shares (MLX_RANK, MJC_MODEL and backend variables come on top)."""
    leader_ip = _first_ips(ordered)[0]
    env = {
        "MLX_WORLD_SIZE": str(len(ordered)),
        "MJC_BACKEND": setting(group, "cluster_backend"),
        "MJC_PARALLEL": setting(group, "cluster_parallel"),
        "MJC_MODEL_ID": setting(group, "cluster_model_name"),
        "MJC_CONTROL": f"{leader_ip}:{setting(group, 'cluster_control_port')}",
        "MJC_PEER_IPS": ",".join(_first_ips(ordered)),
        "MJC_API_HOST": setting(group, "cluster_api_host"),
        "MJC_API_PORT": str(setting(group, "cluster_api_port")),
    }
    if setting(group, "cluster_api_key"):
        env["MJC_API_KEY"] = setting(group, "cluster_api_key")
    for name, value in sorted(runtime_settings(group).items()):
        env[f"MJC_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else value
    return {key: str(value) for key, value in env.items()}


def _backend_env(
    backend: str, group: Mapping[str, Any], leader_ip: str, variables: Mapping[str, Any]
) -> dict[str, str]:
    """Backend variables other than the rank-file path."""
    if backend in JACCL_BACKENDS:
        env = {"MLX_JACCL_COORDINATOR": f"{leader_ip}:{setting(group, 'cluster_coordinator_port')}"}
        return env | ({"MLX_JACCL_RING": "1"} if backend == "jaccl-ring" else {})
    if backend == "nccl":
        return {
            "NCCL_HOST_IP": leader_ip,
            "NCCL_PORT": str(setting(group, "cluster_coordinator_port")),
            "CUDA_VISIBLE_DEVICES": str(setting(variables, "cluster_cuda_device")),
        }
    return {}


def _rank_entry(
    rank: int,
    name: str,
    variables: Mapping[str, Any],
    group: Mapping[str, Any],
    ordered: list[tuple[str, Mapping[str, Any]]],
) -> dict[str, Any]:
    """What one rank's roles need: where it runs, its service env, argv and files."""
    backend = setting(group, "cluster_backend")
    prefix = node_setting(group, variables, "cluster_install_prefix").rstrip("/")
    unit = setting(variables, "cluster_unit_name")
    etc_dir = f"{prefix}/etc/{unit}"
    env = {
        "MLX_RANK": str(rank),
        **_common_env(group, ordered),
        "MJC_MODEL": str(node_setting(group, variables, "cluster_model_path")),
        # the secret itself never enters the environment or a unit file (backend_config writes it, mode 0600)
        "MJC_CLUSTER_SECRET_FILE": f"{etc_dir}/{CLUSTER_SECRET_FILE}",
        **_backend_env(backend, group, _first_ips(ordered)[0], variables),
    }
    files: dict[str, Any] = {}
    if backend in BACKEND_FILES:
        variable, filename = BACKEND_FILES[backend]
        env[variable] = f"{etc_dir}/{filename}"
        files[f"{unit}/{filename}"] = _backend_file(backend, ordered)
    return {
        "rank": rank,
        "ssh": ssh_target(name, variables),
        "ips": [str(ip) for ip in setting(variables, "cluster_ips")],
        "unit_name": unit,
        "prefix": prefix,
        "etc_dir": etc_dir,
        "python": node_setting(group, variables, "cluster_python"),
        "service_user": node_setting(group, variables, "cluster_service_user"),
        "service_manager": node_setting(group, variables, "cluster_service_manager"),
        "env": env,
        "files": files,
        "argv": [f"{prefix}/venv/bin/mjc-rank"],
        "layers": variables.get("cluster_layers"),  # pipeline layers pinned here (ops/placement.py)
    }


def _api_url(group: Mapping[str, Any], ordered: list[tuple[str, Mapping[str, Any]]]) -> str:
    """Where the controller reaches rank 0's API (its ssh target when the API binds a wildcard)."""
    host = setting(group, "cluster_api_host")
    if host in WILDCARD_BINDS:
        host = ssh_target(*ordered[0])
    return f"http://{host}:{setting(group, 'cluster_api_port')}"


def cluster_plan(hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any]) -> dict[str, Any]:
    """The one rendered fact every role reads; ValueError lists the problems of a bad inventory.

    ``ranks``: hostnames in rank order; ``hosts``: hostname -> rank entry (rank, ssh, ips,
    unit_name, prefix, etc_dir, python, service_user, service_manager, env, files relative to
    ``<prefix>/etc/``, argv, primary: first rank on its machine); plus ``hostfile``
    (mlx.launch object form), ``world_size``, ``backend``, ``parallel``, ``control`` and
    ``api_url``.
    """
    problems = validate_cluster(hosts, group)
    if problems:
        raise ValueError("the inventory is not valid:\n" + "\n".join(f"- {p}" for p in problems))
    ordered = ordered_hosts(hosts)
    backend = setting(group, "cluster_backend")
    entries = {name: _rank_entry(rank, name, v, group, ordered) for rank, (name, v) in enumerate(ordered)}
    # Several ranks may share one machine (and its install prefix): the first of them
    # ("primary") does the per-machine work (venv, model, service manager).
    seen: set[tuple[str, str]] = set()
    for entry in entries.values():
        machine = (entry["ssh"], entry["prefix"])
        entry["primary"] = machine not in seen
        seen.add(machine)
    return {
        "world_size": len(ordered),
        "backend": backend,
        "parallel": setting(group, "cluster_parallel"),
        "control": f"{_first_ips(ordered)[0]}:{setting(group, 'cluster_control_port')}",
        "api_url": _api_url(group, ordered),
        "hostfile": launch_hostfile(backend, ordered),
        "ranks": [name for name, _ in ordered],
        "hosts": entries,
    }
