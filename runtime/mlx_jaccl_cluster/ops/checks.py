"""Preflight: every problem of the ``mlx_cluster`` inventory at once, before any host is touched.

:func:`validate_cluster` checks the group variables, the ranks, each host's variables, what
must be unique per machine (ports, unit names, GPUs) and across machines (addresses), the
model against the layout and, for jaccl, the RDMA matrix (:mod:`.rdma`). Each
:class:`~.schema.Problem` names the host, the field and the fix.

``hosts`` maps an inventory hostname to its variables as Ansible's ``hostvars`` give them;
``group`` holds the group variables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from . import fields
from .rdma import rdma_problems
from .schema import (
    BACKENDS,
    COORDINATOR_BACKENDS,
    GROUP,
    GROUP_DEFAULTS,
    HOST_DEFAULTS,
    JACCL_BACKENDS,
    MAX_THUNDERBOLT_PORTS,
    MLX_EXTRAS,
    MODEL_SOURCES,
    NODE_KEYS,
    PARALLEL_MODES,
    REMOVED_KEYS,
    RUNTIME_OWNED,
    SECRET_KEYS,
    SERVICE_MANAGERS,
    UNIT_NAME,
    Problem,
    choices,
    describe,
    is_int,
    ordered_hosts,
    setting,
    ssh_target,
)

# --- group variables and the model ---------------------------------------------------------


MODEL_PATH_EXAMPLE = f"{GROUP_DEFAULTS['cluster_install_prefix']}/models/SmolLM2-135M-Instruct"
# Group variable -> its check, called as check(where, variables, key).
GROUP_CHECKS: dict[str, Callable[[str, Mapping[str, Any], str], Problem | None]] = {
    "cluster_backend": partial(fields.choice, options=BACKENDS),
    "cluster_parallel": partial(fields.choice, options=PARALLEL_MODES),
    "cluster_model_source": partial(fields.choice, options=MODEL_SOURCES),
    "cluster_service_manager": partial(fields.choice, options=SERVICE_MANAGERS),
    "cluster_model_name": partial(fields.text, example="SmolLM2-135M-Instruct"),
    "cluster_model_path": partial(fields.abs_path, example=MODEL_PATH_EXAMPLE),
    "cluster_install_prefix": partial(fields.abs_path, example=GROUP_DEFAULTS["cluster_install_prefix"]),
    "cluster_python": partial(fields.abs_path, example=GROUP_DEFAULTS["cluster_python"]),
    "cluster_api_host": lambda host, variables, key: (
        fields.text(host, variables, key, "127.0.0.1") or fields.bind_problem(host, variables)
    ),
    "cluster_api_key": fields.secret_problem,
    "cluster_secret": fields.secret_problem,
    "cluster_api_allow_open": fields.bool_problem,
    "cluster_name": fields.name_problem,
    "cluster_controller_cache": partial(
        fields.abs_path,
        example=GROUP_DEFAULTS["cluster_controller_cache"],
        on="the controller (or one under ~)",
        roots=("/", "~"),
    ),
    "cluster_mlx_extra": partial(fields.choice, options=MLX_EXTRAS),
    "cluster_uninstall_models": fields.flag_problem,
    "cluster_api_port": fields.port,
    "cluster_control_port": fields.port,
    "cluster_coordinator_port": fields.port,
}


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
                f"is {describe(value)}; it must be a mapping",
                f"write it as a mapping of mjc-rank settings, e.g. {key}: {{max_batch: 16}}",
            )
        ]
    # pydantic, not MLX: the controller has the runtime package installed
    from pydantic import TypeAdapter, ValidationError

    from ..settings import Settings, step_budget_problem

    tunable = sorted(k for k in Settings.model_fields if k not in RUNTIME_OWNED)
    found = []
    for name, item in value.items():
        field_name = f"{key}.{name}"
        info = Settings.model_fields.get(str(name))
        if info is None or name in RUNTIME_OWNED:
            why = "is set by the inventory's own variables" if name in RUNTIME_OWNED else "is not an mjc-rank setting"
            found.append(
                Problem(GROUP, field_name, why, f"remove it; settable here: {choices(tunable)} (mjc-rank --help)")
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
                    f"is {describe(item)}: {reason}",
                    f"give a value that fits: {info.description or name}",
                )
            )
    if not found:  # the one rule across two settings (Settings checks it again at start-up)
        budget = value.get("step_token_budget", Settings.default("step_token_budget"))
        batch = value.get("max_batch", Settings.default("max_batch"))
        problem = step_budget_problem(budget, batch)
        if problem:
            found.append(
                Problem(
                    GROUP,
                    f"{key}.step_token_budget",
                    problem,
                    f"raise step_token_budget above {batch} or lower max_batch",
                )
            )
        from ..layout import LayoutError, transport

        try:  # a hand-over the backend cannot run (send on nccl)
            transport(
                setting(group, "cluster_backend"),
                value.get("pipeline_transport", Settings.default("pipeline_transport")),
            )
        except LayoutError as exc:
            found.append(
                Problem(GROUP, f"{key}.pipeline_transport", str(exc), "remove it (auto picks all_gather on nccl)")
            )
    return found


def _group_problems(group: Mapping[str, Any]) -> list[Problem]:
    """Types, choices and required keys of the group variables."""
    found = [check(GROUP, group, key) for key, check in GROUP_CHECKS.items()]
    found += _runtime_settings_problems(group) + fields.open_api_problems(group)
    source = setting(group, "cluster_model_source")
    if source == "hf":
        found.append(
            fields.text(
                GROUP, group, "cluster_model_repo", "HuggingFaceTB/SmolLM2-135M-Instruct", "cluster_model_source is hf"
            )
        )
    if source == "local":
        found.append(
            fields.text(
                GROUP,
                group,
                "cluster_model_local_path",
                "~/models/SmolLM2-135M-Instruct",
                "cluster_model_source is local",
            )
        )
    return [p for p in found if p]


def _removed_problems(hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any]) -> list[Problem]:
    """Variables the project no longer reads (REMOVED_KEYS): named once for the group when
    every host has it (group_vars), else for each host that sets it."""
    found = []
    for key, fix in REMOVED_KEYS.items():
        setters = [name for name, variables in hosts.items() if key in variables]
        if key in group or (setters and len(setters) == len(hosts)):
            setters = [GROUP]
        found += [Problem(where, key, "is set but no longer used", fix) for where in setters]
    return found


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
            secret = key in SECRET_KEYS
            mine = "a different value (not shown)" if secret else describe(value)
            theirs = "" if secret else f" but {describe(setting(group, key))} for the group"
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
        layout = choose(dict(model_config), world_size, parallel, setting(group, "cluster_backend"))
    except LayoutError as exc:
        fix = "set cluster_parallel: auto" if parallel != "auto" else "the message names what can split it"
        return [Problem(GROUP, "cluster_parallel", f"is {parallel}: {exc}", fix)]
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
    taken = {r for r in ranks.values() if is_int(r) and 0 <= r < n}
    free = ", ".join(str(r) for r in range(n) if r not in taken) or "none"
    renumber = f"give every host its own cluster_rank in 0..{n - 1} (free: {free})"
    found: list[Problem] = []
    owner: dict[int, str] = {}
    for name, rank in ranks.items():
        if rank is None:
            found.append(Problem(name, "cluster_rank", "is missing", renumber))
        elif not is_int(rank):
            fix = (
                f"write it without quotes: cluster_rank: {rank}"
                if isinstance(rank, str) and rank.isdigit()
                else renumber
            )
            found.append(Problem(name, "cluster_rank", f"is {describe(rank)}; a rank must be a whole number", fix))
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


def _ips_problems(name: str, variables: Mapping[str, Any]) -> list[Problem]:
    """cluster_ips is a list of IPv4 addresses / hostnames."""
    ips = setting(variables, "cluster_ips")
    if isinstance(ips, str):
        return [
            Problem(
                name,
                "cluster_ips",
                f"is {describe(ips)}; it must be a list",
                f"write it as a list: cluster_ips: [{ips}]",
            )
        ]
    if not isinstance(ips, list):
        return [
            Problem(
                name,
                "cluster_ips",
                f"is {describe(ips)}; it must be a list of addresses",
                "write e.g. cluster_ips: [192.168.1.14]",
            )
        ]
    return [
        Problem(
            name, f"cluster_ips[{i}]", error, "use this host's IPv4 address on the cluster network, e.g. 192.168.1.14"
        )
        for i, ip in enumerate(ips)
        if (error := fields.ip_error(ip))
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
        elif (
            ips
            and rank > 0
            and isinstance(ips[0], str)
            and not fields.address_error(ips[0])
            and not fields.is_ipv4(ips[0])
        ):
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
        fields.port(name, variables, "cluster_ring_port") if backend == "ring" else None,
        _cuda_device_problem(name, variables) if backend == "nccl" else None,
        _layers_problem(name, variables),
    ]
    return [p for p in found if p] + _ips_problems(name, variables)


def _ansible_host_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    problem = fields.text(name, variables, "ansible_host", "192.168.1.14")
    error = None if problem else fields.host_or_ip_error(setting(variables, "ansible_host"))
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
    if value is None or (is_int(value) and 1 <= value <= MAX_THUNDERBOLT_PORTS):
        return None
    return Problem(
        name,
        "cluster_thunderbolt_ports",
        f"is {describe(value)}; it is how many Thunderbolt ports this Mac has",
        f"give a whole number 1..{MAX_THUNDERBOLT_PORTS} (Mac mini M4 Pro: 3, Mac Studio M4 Max: 4, "
        "M3 Ultra: 6), or remove it",
    )


def _layers_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = variables.get("cluster_layers")
    if value is None or (is_int(value) and value > 0):
        return None
    return Problem(
        name,
        "cluster_layers",
        f"is {describe(value)}; it must be a positive integer",
        "give this rank's number of pipeline layers, e.g. cluster_layers: 10, or remove it (split by memory)",
    )


def _unit_name_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = setting(variables, "cluster_unit_name")
    if not isinstance(value, str) or not UNIT_NAME.match(value):
        return Problem(
            name,
            "cluster_unit_name",
            f"is {describe(value)}; it names the service and its folder",
            "use letters, digits, '.', '_', '-' or '@' (starting with a letter or digit), e.g. mlx-jaccl-cluster-rank1",
        )
    return None


def _cuda_device_problem(name: str, variables: Mapping[str, Any]) -> Problem | None:
    value = setting(variables, "cluster_cuda_device")
    if (is_int(value) and value >= 0) or (isinstance(value, str) and value.strip()):
        return None
    return Problem(
        name,
        "cluster_cuda_device",
        f"is {describe(value)}; it becomes CUDA_VISIBLE_DEVICES",
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
    return [c for c in claims if is_int(c.value) and 0 < c.value < 65536]


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
                f"{HOST_DEFAULTS[key]}-rank{rank if is_int(rank) else 1}"
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
            if not isinstance(ip, str) or fields.ip_error(ip):
                continue
            if fields.is_loopback(ip) and len(machines) > 1:
                found.append(
                    Problem(
                        name,
                        f"cluster_ips[{i}]",
                        f"is {ip}, which reaches only the machine itself, "
                        f"but the ranks run on {len(machines)} machines ({choices(sorted(machines))})",
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
            and is_int(setting(v, "cluster_ring_port"))
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
    found = _group_problems(group) + _removed_problems(hosts, group)
    found += _override_problems(hosts, group, sources) + _rank_problems(hosts)
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
            found += rdma_problems(ordered, backend)
    return found
