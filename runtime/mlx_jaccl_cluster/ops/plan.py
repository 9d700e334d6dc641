"""The cluster plan: one rendered fact every role reads (``mjc_plan``).

:func:`cluster_plan` turns a valid inventory into the ``mlx.launch`` hostfile and, per rank,
where it runs, its install prefix, python, service manager, unit, the service's
environment, argv and backend files, plus where rank 0's API answers. Roles read these
values from the plan, never from ``cluster_*`` variables again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .checks import validate_cluster
from .fields import as_flag, is_loopback
from .macos import MIN_MACOS
from .rdma import rdma_matrix
from .schema import (
    BACKEND_FILES,
    CLUSTER_SECRET_FILE,
    GROUP,
    JACCL_BACKENDS,
    SECRET_KEYS,
    WILDCARD_BINDS,
    node_setting,
    ordered_hosts,
    runtime_settings,
    setting,
    ssh_target,
)


def _first_ips(ordered: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    return [str(setting(v, "cluster_ips")[0]) for _, v in ordered]


def _backend_file(backend: str, ordered: list[tuple[str, Mapping[str, Any]]]) -> Any:
    """Content of the backend's rank file (same on every rank); None when it has none."""
    if backend == "ring":
        return [[f"{ip}:{setting(v, 'cluster_ring_port')}"] for ip, (_, v) in zip(_first_ips(ordered), ordered)]
    if backend in JACCL_BACKENDS:
        return rdma_matrix(ordered)
    return None


def launch_hostfile(backend: str, ordered: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The ``mlx.launch`` hostfile (object form) for this cluster."""
    rdma = rdma_matrix(ordered) if backend in JACCL_BACKENDS else [[] for _ in ordered]
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
        "service_manager": node_setting(group, variables, "cluster_service_manager"),
        "model_path": env["MJC_MODEL"],
        "env": env,
        "files": files,
        "argv": [f"{prefix}/venv/bin/mjc-rank"],
        "layers": variables.get("cluster_layers"),  # pipeline layers pinned here (ops/placement.py)
    }


def _api_urls(group: Mapping[str, Any], ordered: list[tuple[str, Mapping[str, Any]]]) -> tuple[str, str]:
    """Where rank 0's API answers: from the controller, and from rank 0's own machine.

    A wildcard bind (WILDCARD_BINDS) answers the controller at rank 0's ssh target and rank 0
    itself at 127.0.0.1; a loopback bind answers only on rank 0's machine, at 127.0.0.1.
    """
    host, port = setting(group, "cluster_api_host"), setting(group, "cluster_api_port")
    wildcard = host in WILDCARD_BINDS
    remote = ssh_target(*ordered[0]) if wildcard else host
    local = "127.0.0.1" if wildcard or (is_loopback(host) and ":" not in host) else host
    remote_url, local_url = (f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}" for h in (remote, local))
    return remote_url, local_url


def controller_model_dir(group: Mapping[str, Any]) -> str | None:
    """The model's folder on the controller: ``cluster_model_local_path`` for a local model,
    else ``<controller cache>/models/<name>``; None while the name is unknown."""
    if setting(group, "cluster_model_source") == "local":
        return setting(group, "cluster_model_local_path")
    name = setting(group, "cluster_model_name")
    cache = setting(group, "cluster_controller_cache")
    if not isinstance(name, str) or not name or not isinstance(cache, str):
        return None
    return f"{os.path.expanduser(cache)}/models/{name}"


def cluster_plan(
    hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any], default_name: str | None = None
) -> dict[str, Any]:
    """The one rendered fact every role reads; ValueError lists the problems of a bad inventory.

    ``ranks``: hostnames in rank order; ``hosts``: hostname -> rank entry (rank, ssh, ips,
    unit_name, prefix, etc_dir, python, service_manager, model_path, env, files relative to
    ``<prefix>/etc/``, argv, layers, primary: first rank on its machine); plus ``hostfile``
    (mlx.launch object form), ``world_size``, ``backend``, ``parallel``, ``control``,
    ``api_url`` (from the controller), ``local_api_url`` (on rank 0's machine), ``model``
    (source, name, repo, local_path, dir: its folder on the controller), ``name``
    (``cluster_name``, else ``default_name``: the inventory folder's), ``controller_cache``,
    ``mlx_extra``, ``uninstall_models``, ``runtime_settings``, ``cluster_secret`` (the
    inventory's, "" to generate one), ``sensitive`` (it holds a secret: no_log) and
    ``macos_min`` (the oldest macOS with RDMA over Thunderbolt).
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
    api_url, local_api_url = _api_urls(group, ordered)
    return {
        "world_size": len(ordered),
        "backend": backend,
        "parallel": setting(group, "cluster_parallel"),
        "control": f"{_first_ips(ordered)[0]}:{setting(group, 'cluster_control_port')}",
        "api_url": api_url,
        "local_api_url": local_api_url,
        "name": setting(group, "cluster_name") or default_name or GROUP,
        "model": {
            "source": setting(group, "cluster_model_source"),
            "name": setting(group, "cluster_model_name"),
            "repo": setting(group, "cluster_model_repo") or "",
            "local_path": setting(group, "cluster_model_local_path") or "",
            "dir": controller_model_dir(group),  # on the controller
        },
        "controller_cache": os.path.expanduser(setting(group, "cluster_controller_cache")),
        "mlx_extra": setting(group, "cluster_mlx_extra"),
        "uninstall_models": as_flag(setting(group, "cluster_uninstall_models")),
        "runtime_settings": runtime_settings(group),
        "cluster_secret": setting(group, "cluster_secret"),
        "sensitive": any(setting(group, key) for key in SECRET_KEYS),
        "macos_min": ".".join(map(str, MIN_MACOS)),
        "hostfile": launch_hostfile(backend, ordered),
        "ranks": [name for name, _ in ordered],
        "hosts": entries,
    }
