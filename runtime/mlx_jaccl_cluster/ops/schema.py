"""The ``mlx_cluster`` inventory's schema: its variables, their defaults, and how to read them.

Every ``cluster_*`` variable the roles use is named here once with its default
(:data:`GROUP_DEFAULTS`, :data:`HOST_DEFAULTS`); :func:`setting` reads a value or its default,
so no other file repeats a default; the roles read them only through the plan
(:mod:`.plan`). :class:`Problem` is what the checks (:mod:`.checks`) report. Runs on the
controller (standard library and the runtime's pydantic ``Settings``, never MLX).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..settings import Settings

GROUP = "mlx_cluster"
BACKENDS = ("jaccl", "jaccl-ring", "ring", "nccl")
PARALLEL_MODES = ("auto", "tensor", "pipeline")  # layout.PARALLEL_CHOICES
MODEL_SOURCES = ("smollm2", "hf", "local")
SERVICE_MANAGERS = ("auto", "launchd", "systemd", "supervisord")
MLX_EXTRAS = ("auto", "cpu", "cuda13", "metal")  # the mlx wheel's extra (python_env)
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
    # A cluster serves its network (rank 0 started by hand binds Settings.api_host, 127.0.0.1);
    # a non-loopback bind needs cluster_api_key or cluster_api_allow_open (fields.open_api_problems).
    "cluster_api_host": "0.0.0.0",
    "cluster_api_port": Settings.model_fields["api_port"].default,  # the rank's own default
    "cluster_api_key": "",
    "cluster_api_allow_open": False,  # serve a non-loopback bind without a key, on purpose
    "cluster_secret": "",  # the control channel's secret; "" -> generated once on the controller
    "cluster_control_port": 32400,
    "cluster_coordinator_port": 32323,
    "cluster_install_prefix": "/opt/mlx-jaccl-cluster",
    "cluster_service_manager": "auto",
    "cluster_python": "/usr/bin/python3",
    "cluster_runtime_settings": None,  # a mapping of mjc-rank settings, e.g. {max_batch: 16}
    "cluster_name": None,  # names the cluster's files on the controller; None: the inventory folder's name
    "cluster_controller_cache": "~/.cache/mlx-jaccl-cluster",  # models, wheelhouses, secrets
    "cluster_mlx_extra": "auto",  # auto: cpu on Linux, Metal on macOS
    "cluster_uninstall_models": False,  # uninstall also deletes the model (-e key=true gives a string)
}
# Variables the project no longer reads: preflight names them so none is silently ignored.
REMOVED_KEYS = {
    "cluster_service_user": "the ranks run as the account Ansible logs in as (ansible_user): remove it",
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
INVENTORY_KEYS = (*GROUP_DEFAULTS, *HOST_DEFAULTS, *REMOVED_KEYS)
SECRET_KEYS = ("cluster_api_key", "cluster_secret")  # never shown in a message
# Group variables a host may set for itself (paths and users differ between machines, e.g.
# "/Users/{{ ansible_user }}/..."); every other group variable must be the same on all ranks.
NODE_KEYS = (
    "cluster_install_prefix",
    "cluster_model_path",
    "cluster_python",
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
        default = GROUP_DEFAULTS[key] if key in GROUP_DEFAULTS else HOST_DEFAULTS.get(key)
        return list(default) if isinstance(default, tuple) else default
    return value


def node_setting(group: Mapping[str, Any], variables: Mapping[str, Any], key: str) -> Any:
    """A NODE_KEYS value for one host: its own when set, else the group's."""
    return setting(variables, key) if variables.get(key) is not None else setting(group, key)


def ssh_target(name: str, variables: Mapping[str, Any]) -> str:
    """The machine a rank runs on: ``ansible_host``, else the inventory hostname."""
    return setting(variables, "ansible_host") or name


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def describe(value: Any) -> str:
    """``value`` as a person reads it in YAML: ``the string '0'``, ``a list``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if is_int(value) or isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, list):
        return f"a list {json.dumps(value, default=str)}"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"{value!r} ({type(value).__name__})"


def choices(options: Iterable[str]) -> str:
    return ", ".join(options)


def ordered_hosts(hosts: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(hostname, vars)`` in rank order; call only on hosts whose ranks are valid."""
    return sorted(hosts.items(), key=lambda item: item[1]["cluster_rank"])


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
