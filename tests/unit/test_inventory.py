"""The inventory schema: bad inventories are rejected with host, field and fix; good ones render the plan."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlx_jaccl_cluster.ops.checks import validate_cluster
from mlx_jaccl_cluster.ops.plan import cluster_plan
from mlx_jaccl_cluster.ops.schema import GROUP

Hosts = dict[str, dict[str, Any]]
Inventory = tuple[Hosts, dict[str, Any]]

MODEL = {
    "cluster_model_name": "SmolLM2-135M-Instruct",
    "cluster_model_path": "/opt/mlx-jaccl-cluster/models/SmolLM2-135M-Instruct",
    "cluster_model_source": "smollm2",
    "cluster_api_allow_open": True,  # these bind 0.0.0.0 without a key, on purpose
}
PREFIX = "/opt/mlx-jaccl-cluster"


def two_macs() -> Inventory:
    """The seed's working setup: two Mac minis cabled port-to-port, JACCL mesh."""
    hosts = {
        "mac1": {
            "cluster_rank": 0,
            "ansible_host": "mac1.local",
            "cluster_ips": ["192.168.1.14"],
            "cluster_rdma": [None, "rdma_en4"],
        },
        "mac2": {
            "cluster_rank": 1,
            "ansible_host": "mac2.local",
            "cluster_ips": ["192.168.1.15"],
            "cluster_rdma": ["rdma_en4", None],
        },
    }
    return hosts, {"cluster_backend": "jaccl", **MODEL}


def four_mac_ring() -> Inventory:
    """Four Macs in a Thunderbolt ring: en3 to the next rank, en4 to the previous one."""
    rows = [
        [None, "rdma_en3", None, "rdma_en4"],
        ["rdma_en4", None, "rdma_en3", None],
        [None, "rdma_en4", None, "rdma_en3"],
        ["rdma_en3", None, "rdma_en4", None],
    ]
    hosts = {
        f"mac{r + 1}": {
            "cluster_rank": r,
            "ansible_host": f"mac{r + 1}.local",
            "cluster_ips": [f"10.0.0.{r + 1}"],
            "cluster_rdma": rows[r],
        }
        for r in range(4)
    }
    return hosts, {"cluster_backend": "jaccl-ring", **MODEL}


def four_mac_mesh() -> Inventory:
    """Four Macs fully cabled (jaccl mesh): rank i reaches rank j over rdma_en{2+j}."""
    hosts, group = four_mac_ring()
    for r, variables in enumerate(hosts.values()):
        variables["cluster_rdma"] = [None if j == r else f"rdma_en{2 + j}" for j in range(4)]
    return hosts, {**group, "cluster_backend": "jaccl"}


def local_ring() -> Inventory:
    """Three ranks of the TCP ring backend on one machine."""
    hosts = {
        f"rank{r}": {
            "cluster_rank": r,
            "ansible_host": "127.0.0.1",
            "cluster_ips": ["127.0.0.1"],
            "cluster_ring_port": 32500 + r,
            "cluster_unit_name": f"mlx-jaccl-cluster-rank{r}",
        }
        for r in range(3)
    }
    return hosts, {"cluster_backend": "ring", "cluster_api_host": "127.0.0.1", "cluster_api_port": 8080, **MODEL}


def nccl_pair() -> Inventory:
    """Two Linux GPU hosts over NCCL."""
    hosts = {
        "gpu1": {"cluster_rank": 0, "ansible_host": "gpu1", "cluster_ips": ["10.1.0.1"]},
        "gpu2": {"cluster_rank": 1, "ansible_host": "gpu2", "cluster_ips": ["10.1.0.2"], "cluster_cuda_device": 1},
    }
    return hosts, {"cluster_backend": "nccl", **MODEL}


def single_mac() -> Inventory:
    """One rank: the matrix is [[null]]."""
    hosts = {"mac1": {"cluster_rank": 0, "cluster_ips": ["192.168.1.14"], "cluster_rdma": [None]}}
    return hosts, {"cluster_backend": "jaccl", **MODEL}


def mac_mesh(n: int) -> Inventory:
    """``n`` Macs fully cabled (jaccl mesh): rank i reaches rank j over rdma_en{2+j}."""
    hosts = {
        f"mac{r + 1}": {
            "cluster_rank": r,
            "ansible_host": f"mac{r + 1}.local",
            "cluster_ips": [f"10.0.0.{r + 1}"],
            "cluster_rdma": [None if j == r else f"rdma_en{2 + j}" for j in range(n)],
        }
        for r in range(n)
    }
    return hosts, {"cluster_backend": "jaccl", **MODEL}


def keyed_macs() -> Inventory:
    """two_macs serving the network with a key instead of the opt-in."""
    hosts, group = two_macs()
    group.pop("cluster_api_allow_open")
    return hosts, group | {"cluster_api_key": "0123456789abcdef0123456789abcdef"}


def ipv6_ssh() -> Inventory:
    """The controller reaches the Macs over IPv6; the ranks still meet over IPv4."""
    hosts, group = two_macs()
    hosts["mac1"]["ansible_host"] = "fd00::14"
    return hosts, group


GOOD = [
    two_macs,
    four_mac_ring,
    four_mac_mesh,
    local_ring,
    nccl_pair,
    single_mac,
    keyed_macs,
    ipv6_ssh,
    lambda: mac_mesh(7),
]


@pytest.mark.parametrize("inventory", GOOD, ids=lambda f: f.__name__)
def test_good_inventories_have_no_problems(inventory: Callable[[], Inventory]) -> None:
    hosts, group = inventory()
    assert validate_cluster(hosts, group) == []


# --- bad inventories --------------------------------------------------------------------------


Change = Callable[[Hosts, dict], Any]


def host_set(name: str, **values: Any) -> Change:
    return lambda hosts, group: hosts[name].update(values)


def group_set(**values: Any) -> Change:
    return lambda hosts, group: group.update(values)


def host_drop(name: str, key: str) -> Change:
    return lambda hosts, group: hosts[name].pop(key)


def group_drop(key: str) -> Change:
    return lambda hosts, group: group.pop(key)


def rdma_cells(*cells: tuple[str, int, Any]) -> Change:
    """Set ``cluster_rdma[j]`` of host ``name`` for each ``(name, j, value)``."""
    return lambda hosts, group: [hosts[name]["cluster_rdma"].__setitem__(j, value) for name, j, value in cells]


def every_host_drop(key: str) -> Change:
    return lambda hosts, group: [variables.pop(key) for variables in hosts.values()]


def no_change(hosts: Hosts, group: dict) -> None:
    return None


def case(case_id: str, base: Callable[[], Inventory], change: Change, host: str, field: str, hint: str, **kwargs: Any):
    """One bad inventory: ``change`` breaks ``base``; a problem must name host, field and a fix containing ``hint``."""
    return pytest.param(base, change, host, field, hint, kwargs, id=case_id)


# fmt: off
BAD = [
    case("rank-quoted", two_macs, host_set("mac2", cluster_rank="1"), "mac2", "cluster_rank", "without quotes"),
    case("rank-duplicate", two_macs, host_set("mac2", cluster_rank=0), "mac2", "cluster_rank", "free: 1"),
    case("rank-out-of-range", two_macs, host_set("mac2", cluster_rank=2), "mac2", "cluster_rank", "0..1"),
    case("rank-missing", two_macs, host_drop("mac1", "cluster_rank"), "mac1", "cluster_rank", "free: 0"),
    case("empty-group", two_macs, lambda h, g: h.clear(), GROUP, "hosts", "add at least one host"),
    case("ips-not-a-list", two_macs, host_set("mac1", cluster_ips="192.168.1.14"), "mac1", "cluster_ips", "[192.168.1.14]"),
    case("rank0-without-ip", two_macs, host_set("mac1", cluster_ips=[]), "mac1", "cluster_ips", "IPv4 address"),
    case("bad-ipv4", two_macs, host_set("mac1", cluster_ips=["192.168.1.300"]), "mac1", "cluster_ips[0]", "IPv4"),
    case("ip-with-port", two_macs, host_set("mac2", cluster_ips=["192.168.1.15:22"]), "mac2", "cluster_ips[0]", "IPv4"),
    case("peer-without-ip", two_macs, host_set("mac2", cluster_ips=[]), "mac2", "cluster_ips", "IPv4 address"),
    case("peer-hostname-first", two_macs, host_set("mac2", cluster_ips=["mac2.local"]), "mac2", "cluster_ips[0]", "IPv4 address"),
    case("ring-rank-without-ip", local_ring, host_set("rank2", cluster_ips=[]), "rank2", "cluster_ips", "IPv4 address"),
    case("unknown-backend", two_macs, group_set(cluster_backend="mesh"), GROUP, "cluster_backend", "jaccl, jaccl-ring, ring, nccl"),
    case("missing-backend", two_macs, group_drop("cluster_backend"), GROUP, "cluster_backend", "one of: jaccl"),
    case("unknown-parallel", two_macs, group_set(cluster_parallel="data"), GROUP, "cluster_parallel", "tensor, pipeline"),
    case("unknown-service-manager", two_macs, group_set(cluster_service_manager="runit"), GROUP, "cluster_service_manager", "launchd"),
    case("missing-model-name", two_macs, group_drop("cluster_model_name"), GROUP, "cluster_model_name", "group_vars"),
    case("relative-model-path", two_macs, group_set(cluster_model_path="models/x"), GROUP, "cluster_model_path", "absolute path"),
    case("relative-path-on-one-host", two_macs, host_set("mac2", cluster_install_prefix="mjc"), "mac2", "cluster_install_prefix",
         "absolute path"),
    case("hf-without-repo", two_macs, group_set(cluster_model_source="hf"), GROUP, "cluster_model_repo", "HuggingFaceTB/"),
    case("local-without-folder", two_macs, group_set(cluster_model_source="local"), GROUP, "cluster_model_local_path",
         "cluster_model_local_path:"),
    case("api-key-not-a-string", two_macs, group_set(cluster_api_key=1234), GROUP, "cluster_api_key", "quote it"),
    case("port-quoted", two_macs, group_set(cluster_api_port="8080"), GROUP, "cluster_api_port", "without quotes"),
    case("port-out-of-range", two_macs, group_set(cluster_control_port=70000), GROUP, "cluster_control_port", "1..65535"),
    case("api-equals-control", two_macs, group_set(cluster_control_port=8080), GROUP, "cluster_control_port", "own port"),
    case("coordinator-equals-api", nccl_pair, group_set(cluster_coordinator_port=8080), GROUP, "cluster_coordinator_port", "own port"),
    case("ring-ports-default-on-one-machine", local_ring, every_host_drop("cluster_ring_port"), "rank1", "cluster_ring_port",
         "cluster_ring_port: 32501"),
    case("ring-ports-clash-suggests-distinct-ports", local_ring, every_host_drop("cluster_ring_port"), "rank2", "cluster_ring_port",
         "cluster_ring_port: 32502"),
    case("ring-port-equals-api", local_ring, host_set("rank1", cluster_ring_port=8080), "rank1", "cluster_ring_port", "own port"),
    case("unit-name-shared-on-machine", local_ring, host_set("rank2", cluster_unit_name="mlx-jaccl-cluster-rank0"), "rank2",
         "cluster_unit_name", "e.g. mlx-jaccl-cluster-rank2"),
    case("unit-name-unsafe", two_macs, host_set("mac1", cluster_unit_name="my unit/1"), "mac1", "cluster_unit_name", "letters, digits"),
    case("group-var-set-per-host", two_macs, host_set("mac2", cluster_backend="ring"), "mac2", "cluster_backend", "group_vars/mlx_cluster"),
    case("nccl-same-gpu-on-one-host", nccl_pair, host_set("gpu2", ansible_host="gpu1", cluster_cuda_device=0), "gpu2",
         "cluster_cuda_device", "own cluster_cuda_device"),
    case("rdma-missing", two_macs, host_drop("mac2", "cluster_rdma"), "mac2", "cluster_rdma", '["rdma_en2", null]'),
    case("rdma-not-a-list", two_macs, host_set("mac1", cluster_rdma="rdma_en4"), "mac1", "cluster_rdma", "as a list"),
    case("rdma-not-square", two_macs, host_set("mac1", cluster_rdma=[None, "rdma_en4", None]), "mac1", "cluster_rdma", "one cell per rank"),
    case("rdma-diagonal-set", two_macs, rdma_cells(("mac1", 0, "rdma_en3")), "mac1", "cluster_rdma[0]", "to null"),
    case("rdma-bad-device-name", two_macs, rdma_cells(("mac2", 0, "en4")), "mac2", "cluster_rdma[0]", "ibv_devices"),
    case("rdma-empty-list-cell", two_macs, rdma_cells(("mac2", 0, [])), "mac2", "cluster_rdma[0]", "ibv_devices"),
    case("rdma-one-end-null", two_macs, rdma_cells(("mac2", 0, None)), "mac2", "cluster_rdma[0]", "(e.g. rdma_en4)"),
    case("rdma-cable-count-differs", two_macs, rdma_cells(("mac2", 0, ["rdma_en4", "rdma_en5"])), "mac2", "cluster_rdma[0]",
         "same number at both ends"),
    case("rdma-port-used-twice", four_mac_mesh, rdma_cells(("mac1", 2, "rdma_en3")), "mac1", "cluster_rdma[2]", "one peer"),
    case("mesh-pair-uncabled", four_mac_mesh, rdma_cells(("mac1", 2, None), ("mac3", 0, None)), "mac3", "cluster_rdma[0]",
         "cable mac3 to mac1"),
    case("ring-neighbour-uncabled", four_mac_ring, rdma_cells(("mac2", 2, None), ("mac3", 1, None)), "mac2", "cluster_rdma[2]",
         "cable mac2 to mac3"),
    case("tensor-heads-indivisible", local_ring, group_set(cluster_parallel="tensor"), GROUP, "cluster_parallel",
         "cluster_parallel: auto", model_config={"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8}),
    case("tensor-heads-in-text-config", two_macs, group_set(cluster_parallel="tensor"), GROUP, "cluster_parallel",
         "cluster_parallel: auto",
         model_config={"model_type": "llava", "text_config": {"num_attention_heads": 9, "num_key_value_heads": 3}}),
    case("pipeline-one-rank", single_mac, group_set(cluster_parallel="pipeline"), GROUP, "cluster_parallel", "add a second host"),
    case("tensor-without-shard", two_macs, group_set(cluster_parallel="tensor"), GROUP, "cluster_parallel",
         "set cluster_parallel: auto", model_config={"model_type": "phi3", "num_attention_heads": 4}),
    case("runtime-settings-not-a-mapping", two_macs, group_set(cluster_runtime_settings=["max_batch=16"]), GROUP,
         "cluster_runtime_settings", "{max_batch: 16}"),
    case("runtime-setting-unknown", two_macs, group_set(cluster_runtime_settings={"max_batches": 16}), GROUP,
         "cluster_runtime_settings.max_batches", "max_batch, "),
    case("runtime-setting-owned-by-inventory", two_macs, group_set(cluster_runtime_settings={"api_port": 9000}), GROUP,
         "cluster_runtime_settings.api_port", "remove it"),
    case("runtime-setting-wrong-type", two_macs, group_set(cluster_runtime_settings={"max_batch": "16"}), GROUP,
         "cluster_runtime_settings.max_batch", "Sequences decoded together"),
    case("runtime-setting-out-of-range", two_macs, group_set(cluster_runtime_settings={"request_timeout": 0}), GROUP,
         "cluster_runtime_settings.request_timeout", "Seconds a request may run"),
    case("runtime-setting-bad-choice", two_macs, group_set(cluster_runtime_settings={"log_level": "loud"}), GROUP,
         "cluster_runtime_settings.log_level", "fits"),
    case("runtime-setting-budget-below-batch", two_macs, group_set(cluster_runtime_settings={"max_batch": 600}), GROUP,
         "cluster_runtime_settings.step_token_budget", "raise step_token_budget above 600"),
    case("runtime-settings-per-host", two_macs, host_set("mac2", cluster_runtime_settings={"max_batch": 4}), "mac2",
         "cluster_runtime_settings", "group_vars/mlx_cluster"),
    # addresses: syntax, and uniqueness across machines
    case("cluster-ip-hostname-on-rank0", two_macs, host_set("mac1", cluster_ips=["mac1.local"]), "mac1", "cluster_ips[0]",
         "IPv4 address"),
    case("cluster-ip-typo", two_macs, host_set("mac1", cluster_ips=["192.168.1.14", "192.168.l.15"]), "mac1", "cluster_ips[1]",
         "IPv4 address"),
    case("cluster-ip-ipv6", two_macs, host_set("mac2", cluster_ips=["fd00::15"]), "mac2", "cluster_ips[0]", "IPv4 address"),
    case("cluster-ip-on-two-macs", two_macs, host_set("mac2", cluster_ips=["192.168.1.14"]), "mac2", "cluster_ips[0]",
         "its own address"),
    case("loopback-across-machines", two_macs, host_set("mac2", cluster_ips=["127.0.0.1"]), "mac2", "cluster_ips[0]",
         "network the ranks share"),
    case("ansible-host-typo", two_macs, host_set("mac1", ansible_host="mac1..local"), "mac1", "ansible_host", "mac1.local"),
    case("ansible-host-with-port", two_macs, host_set("mac1", ansible_host="192.168.1.14:22"), "mac1", "ansible_host",
         "over SSH"),
    case("ansible-host-bad-ipv4", two_macs, host_set("mac2", ansible_host="192.168.1.300"), "mac2", "ansible_host", "over SSH"),
    case("jaccl-two-ranks-one-mac", two_macs, host_set("mac2", ansible_host="mac1.local"), "mac2", "ansible_host",
         "cluster_backend: ring"),
    case("ring-port-clash-on-one-address", local_ring, host_set("rank1", ansible_host="localhost", cluster_ring_port=32500),
         "rank1", "cluster_ring_port", "own cluster_ring_port"),
    # stated limits: Thunderbolt ports, the API key, an open API
    case("mesh-more-macs-than-ports", lambda: mac_mesh(8), no_change, "mac1", "cluster_backend", "jaccl-ring"),
    case("mesh-more-than-stated-ports", four_mac_mesh, host_set("mac3", cluster_thunderbolt_ports=2), "mac3", "cluster_backend",
         "at most 3 Macs"),
    case("row-more-cables-than-ports", two_macs, lambda h, g: [h["mac1"].update(cluster_thunderbolt_ports=1),
         rdma_cells(("mac1", 1, ["rdma_en4", "rdma_en5"]), ("mac2", 0, ["rdma_en4", "rdma_en5"]))(h, g)], "mac1",
         "cluster_rdma", "one device per cable"),
    case("thunderbolt-ports-bad", two_macs, host_set("mac1", cluster_thunderbolt_ports=0), "mac1", "cluster_thunderbolt_ports",
         "1..6"),
    case("api-key-short", keyed_macs, group_set(cluster_api_key="abc123"), GROUP, "cluster_api_key", "openssl rand -hex 24"),
    case("open-api-without-key", two_macs, group_drop("cluster_api_allow_open"), GROUP, "cluster_api_host",
         "cluster_api_allow_open: true"),
    case("open-api-named-address", two_macs, group_set(cluster_api_allow_open=False, cluster_api_host="192.168.1.14"), GROUP,
         "cluster_api_host", "openssl rand -hex 24"),
    case("api-host-with-port", two_macs, group_set(cluster_api_host="0.0.0.0:8080"), GROUP, "cluster_api_host", "127.0.0.1"),
    case("allow-open-quoted", two_macs, group_set(cluster_api_allow_open="yes"), GROUP, "cluster_api_allow_open",
         "(no quotes)"),
    case("pipeline-more-ranks-than-layers", local_ring, group_set(cluster_parallel="pipeline"), GROUP, "cluster_parallel",
         "at most 2 hosts", model_config={"num_hidden_layers": 2}),
    case("secret-short", two_macs, group_set(cluster_secret="abc123"), GROUP, "cluster_secret", "openssl rand -hex 24"),
    case("mlx-extra-unknown", two_macs, group_set(cluster_mlx_extra="rocm"), GROUP, "cluster_mlx_extra", "cuda13"),
    case("uninstall-models-not-a-flag", two_macs, group_set(cluster_uninstall_models="maybe"), GROUP,
         "cluster_uninstall_models", "-e cluster_uninstall_models=true"),
    case("controller-cache-relative", two_macs, group_set(cluster_controller_cache="cache"), GROUP,
         "cluster_controller_cache", "absolute path on the controller"),
    case("cluster-name-a-path", two_macs, group_set(cluster_name="a/b"), GROUP, "cluster_name", "my-cluster"),
    case("service-user-removed", two_macs, group_set(cluster_service_user="admin"), GROUP, "cluster_service_user",
         "ansible_user"),
    case("service-user-removed-on-one-host", two_macs, host_set("mac2", cluster_service_user="admin"), "mac2",
         "cluster_service_user", "ansible_user"),
]
# fmt: on


@pytest.mark.parametrize(("base", "change", "host", "field", "hint", "kwargs"), BAD)
def test_bad_inventory_names_host_field_and_fix(base, change, host, field, hint, kwargs) -> None:
    hosts, group = base()
    change(hosts, group)
    problems = validate_cluster(hosts, group, **kwargs)
    listing = "\n".join(map(str, problems)) or "(no problems)"
    assert any(p.host == host and p.field == field and hint in p.fix for p in problems), listing
    assert all(str(p) == f"{p.host}: {p.field}: {p.message} — {p.fix}" for p in problems)


def test_problem_str_reads_host_field_message_fix() -> None:
    hosts, group = two_macs()
    hosts["mac2"]["cluster_rdma"] = [None, None]
    assert [str(p) for p in validate_cluster(hosts, group)] == [
        "mac2: cluster_rdma[0]: is null but mac1 names rdma_en4 for this cable — "
        "set cluster_rdma[0] on mac2 to the device of its end of the cable (e.g. rdma_en4)"
    ]


def test_every_problem_is_collected_not_just_the_first() -> None:
    hosts, group = two_macs()
    group.update(cluster_backend="mesh", cluster_api_port="x")
    hosts["mac1"]["cluster_ips"] = ["300.1.1.1"]
    hosts["mac2"]["cluster_rank"] = "one"
    fields = {(p.host, p.field) for p in validate_cluster(hosts, group)}
    assert {
        (GROUP, "cluster_backend"),
        (GROUP, "cluster_api_port"),
        ("mac1", "cluster_ips[0]"),
        ("mac2", "cluster_rank"),
    } <= fields


def test_a_loopback_api_needs_no_key_and_a_keyed_api_no_opt_in() -> None:
    hosts, group = keyed_macs()
    assert validate_cluster(hosts, group) == []
    group.update(cluster_api_key="", cluster_api_host="127.0.0.1")
    assert validate_cluster(hosts, group) == []
    group.update(cluster_api_host="::1")
    assert validate_cluster(hosts, group) == []


def test_the_api_key_is_never_in_a_message() -> None:
    secret = "hunter2-secret"  # 14 characters: too short
    hosts, group = keyed_macs()
    group["cluster_api_key"] = secret
    hosts["mac2"]["cluster_api_key"] = secret + "-but-longer"
    problems = validate_cluster(hosts, group)
    assert {(p.host, p.field) for p in problems} == {(GROUP, "cluster_api_key"), ("mac2", "cluster_api_key")}
    assert not any(secret in str(p) for p in problems), problems
    group["cluster_api_key"] = 12345678901234567
    assert not any("12345678901234567" in str(p) for p in validate_cluster(hosts, group))


def test_a_value_set_by_another_group_names_that_group() -> None:
    """mac2 is also in group 'fast', whose vars set cluster_api_port: blame the group, not mac2."""
    hosts, group = two_macs()
    hosts["mac2"]["cluster_api_port"] = 9000
    export = {
        "_meta": {"hostvars": {"mac1": {"cluster_rank": 0}, "mac2": {"cluster_rank": 1}}},
        "all": {"children": ["ungrouped", "mlx_cluster", "studios"]},
        "mlx_cluster": {"hosts": ["mac1", "mac2"], "vars": {"cluster_api_port": 8080}},
        "studios": {"children": ["fast"]},
        "fast": {"hosts": ["mac2"], "vars": {"cluster_api_port": 9000}},
    }
    problems = validate_cluster(hosts, group, sources=export)
    assert [str(p) for p in problems] == [
        "mac2: cluster_api_port: is the number 9000 on this host (set by group fast) but the number 8080 for the group — "
        "set cluster_api_port once in group_vars/mlx_cluster and remove it from group fast"
    ]
    export["_meta"]["hostvars"]["mac2"]["cluster_api_port"] = 9000  # the host sets it too
    assert "remove it from host mac2 and group fast" in str(validate_cluster(hosts, group, sources=export)[0])


def test_a_model_tensor_cannot_split_names_the_rank_counts_and_auto() -> None:
    """SmolLM2 (llama, 9/3 heads) over 2 ranks as tensor: the fix names what splits and auto
    (which pipelines it: every model with a layer stack pipelines, layout.choose)."""
    hosts, group = two_macs()
    group["cluster_parallel"] = "tensor"
    config = {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
    [problem] = validate_cluster(hosts, group, model_config=config)
    assert problem.field == "cluster_parallel" and "[1, 3]" in problem.message and "auto" in problem.fix
    group["cluster_parallel"] = "auto"
    assert validate_cluster(hosts, group, model_config=config) == []


def test_nccl_pipelines_pass_preflight_and_a_send_hand_over_is_refused() -> None:
    """MLX's nccl backend has no send/recv: a pipeline there hands over by all_gather
    (layout.transport), so preflight passes it; asking for send/recv there is refused,
    naming the setting and the fix."""
    hosts, group = local_ring()
    group.update(cluster_backend="nccl", cluster_parallel="pipeline")
    config = {"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 3, "num_hidden_layers": 6}
    for rank in ("rank1", "rank2"):  # one GPU each
        hosts[rank]["cluster_cuda_device"] = rank[-1]
    assert validate_cluster(hosts, group, model_config=config) == []
    group["cluster_parallel"] = "auto"
    assert validate_cluster(hosts, group, model_config=config | {"model_type": "phi3"}) == []
    group["cluster_runtime_settings"] = {"pipeline_transport": "send"}
    [problem] = validate_cluster(hosts, group, model_config=config | {"model_type": "phi3"})
    assert problem.field == "cluster_runtime_settings.pipeline_transport", problem
    assert "pipeline_transport=send cannot run on nccl" in problem.message and "all_gather" in problem.fix


def test_jaccl_ring_allows_null_between_non_neighbours() -> None:
    hosts, group = four_mac_ring()
    assert hosts["mac1"]["cluster_rdma"][2] is None
    assert validate_cluster(hosts, group) == []
    group["cluster_backend"] = "jaccl"
    assert {(p.host, p.field) for p in validate_cluster(hosts, group)} >= {
        ("mac1", "cluster_rdma[2]"),
        ("mac3", "cluster_rdma[0]"),
    }


def test_ring_and_nccl_ignore_the_rdma_matrix() -> None:
    hosts, group = nccl_pair()
    hosts["gpu1"]["cluster_rdma"] = "whatever"
    assert validate_cluster(hosts, group) == []


# --- the plan ---------------------------------------------------------------------------------


def test_plan_two_macs_jaccl() -> None:
    plan = cluster_plan(*two_macs())
    matrix = [[None, "rdma_en4"], ["rdma_en4", None]]
    assert plan["ranks"] == ["mac1", "mac2"] and plan["world_size"] == 2
    assert plan["hostfile"] == {
        "backend": "jaccl",
        "envs": [],
        "hosts": [
            {"ssh": "mac1.local", "ips": ["192.168.1.14"], "rdma": [None, "rdma_en4"]},
            {"ssh": "mac2.local", "ips": ["192.168.1.15"], "rdma": ["rdma_en4", None]},
        ],
    }
    mac2 = plan["hosts"]["mac2"]
    assert mac2["env"] == {
        "MLX_RANK": "1",
        "MLX_WORLD_SIZE": "2",
        "MJC_BACKEND": "jaccl",
        "MJC_PARALLEL": "auto",  # resolved from the model by placement (readiness)
        "MJC_MODEL": MODEL["cluster_model_path"],
        "MJC_MODEL_ID": "SmolLM2-135M-Instruct",
        "MJC_CONTROL": "192.168.1.14:32400",
        "MJC_PEER_IPS": "192.168.1.14,192.168.1.15",
        "MJC_API_HOST": "0.0.0.0",
        "MJC_API_PORT": "8080",
        "MLX_JACCL_COORDINATOR": "192.168.1.14:32323",
        "MLX_IBV_DEVICES": f"{PREFIX}/etc/mlx-jaccl-cluster/ibv_devices.json",
        "MJC_CLUSTER_SECRET_FILE": f"{PREFIX}/etc/mlx-jaccl-cluster/cluster-secret",
    }
    assert mac2["files"] == {"mlx-jaccl-cluster/ibv_devices.json": matrix}
    assert mac2["argv"] == [f"{PREFIX}/venv/bin/mjc-rank"]
    assert (mac2["rank"], mac2["ssh"], mac2["ips"], mac2["unit_name"]) == (
        1,
        "mac2.local",
        ["192.168.1.15"],
        "mlx-jaccl-cluster",
    )
    assert plan["api_url"] == "http://mac1.local:8080"
    assert all("MLX_HOSTFILE" not in h["env"] and "MLX_JACCL_RING" not in h["env"] for h in plan["hosts"].values())


def test_plan_jaccl_ring_sets_the_ring_flag() -> None:
    plan = cluster_plan(*four_mac_ring())
    assert plan["hostfile"]["backend"] == "jaccl" and plan["hostfile"]["envs"] == ["MLX_JACCL_RING=1"]
    for rank, name in enumerate(["mac1", "mac2", "mac3", "mac4"]):
        env = plan["hosts"][name]["env"]
        assert (env["MLX_RANK"], env["MJC_BACKEND"], env["MLX_JACCL_RING"]) == (str(rank), "jaccl-ring", "1")
        assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:32323" and "MLX_HOSTFILE" not in env
    assert plan["hosts"]["mac3"]["files"]["mlx-jaccl-cluster/ibv_devices.json"][2] == [
        None,
        "rdma_en4",
        None,
        "rdma_en3",
    ]


def test_plan_local_ring() -> None:
    plan = cluster_plan(*local_ring())
    content = [["127.0.0.1:32500"], ["127.0.0.1:32501"], ["127.0.0.1:32502"]]
    assert plan["api_url"] == "http://127.0.0.1:8080"
    assert plan["hostfile"]["backend"] == "ring"
    for rank in range(3):
        entry = plan["hosts"][f"rank{rank}"]
        unit = f"mlx-jaccl-cluster-rank{rank}"
        assert entry["files"] == {f"{unit}/hostfile.json": content}
        assert entry["env"]["MLX_HOSTFILE"] == f"{PREFIX}/etc/{unit}/hostfile.json"
        assert entry["env"]["MJC_PEER_IPS"] == "127.0.0.1,127.0.0.1,127.0.0.1"
        assert entry["env"]["MJC_API_HOST"] == "127.0.0.1"
        assert not {"MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR", "NCCL_HOST_IP"} & set(entry["env"])


def test_plan_nccl() -> None:
    plan = cluster_plan(*nccl_pair())
    env = plan["hosts"]["gpu2"]["env"]
    assert {k: env[k] for k in ("NCCL_HOST_IP", "NCCL_PORT", "CUDA_VISIBLE_DEVICES", "MLX_WORLD_SIZE")} == {
        "NCCL_HOST_IP": "10.1.0.1",
        "NCCL_PORT": "32323",
        "CUDA_VISIBLE_DEVICES": "1",
        "MLX_WORLD_SIZE": "2",
    }
    assert plan["hosts"]["gpu1"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert plan["hosts"]["gpu2"]["files"] == {}
    assert not {"MLX_HOSTFILE", "MLX_IBV_DEVICES"} & set(env)
    assert plan["hostfile"] == {
        "backend": "nccl",
        "envs": [],
        "hosts": [{"ssh": "gpu1", "ips": ["10.1.0.1"], "rdma": []}, {"ssh": "gpu2", "ips": ["10.1.0.2"], "rdma": []}],
    }


def test_plan_single_rank_and_defaults() -> None:
    plan = cluster_plan(*single_mac())
    entry = plan["hosts"]["mac1"]
    assert entry["ssh"] == "mac1"  # no ansible_host: the inventory hostname
    assert entry["files"] == {"mlx-jaccl-cluster/ibv_devices.json": [[None]]}
    assert entry["env"]["MJC_CONTROL"] == "192.168.1.14:32400" and entry["env"]["MLX_WORLD_SIZE"] == "1"


def test_plan_api_key_only_when_set_and_custom_prefix() -> None:
    hosts, group = local_ring()
    assert "MJC_API_KEY" not in cluster_plan(hosts, group)["hosts"]["rank0"]["env"]
    group.update(cluster_api_key="s3cret-0123456789abcdef", cluster_install_prefix="/srv/mjc/")
    entry = cluster_plan(hosts, group)["hosts"]["rank0"]
    assert entry["env"]["MJC_API_KEY"] == "s3cret-0123456789abcdef"
    assert entry["env"]["MLX_HOSTFILE"] == "/srv/mjc/etc/mlx-jaccl-cluster-rank0/hostfile.json"
    assert entry["argv"] == ["/srv/mjc/venv/bin/mjc-rank"]


def test_plan_passes_runtime_settings_to_every_rank() -> None:
    hosts, group = local_ring()
    group.update(
        cluster_runtime_settings={
            "max_batch": 16,
            "probe_latency_interval": 0,
            "log_level": "debug",
            "request_timeout": 2.5,
        }
    )
    plan = cluster_plan(hosts, group)
    for entry in plan["hosts"].values():
        env = entry["env"]
        assert (env["MJC_MAX_BATCH"], env["MJC_PROBE_LATENCY_INTERVAL"]) == ("16", "0")
        assert (env["MJC_LOG_LEVEL"], env["MJC_REQUEST_TIMEOUT"]) == ("debug", "2.5")
    from mlx_jaccl_cluster.settings import Settings

    env = plan["hosts"]["rank0"]["env"]
    read = Settings.model_validate(
        {k.removeprefix("MJC_").lower(): v for k, v in env.items() if k.startswith("MJC_")}
        | {"world_size": 3, "rank": 0, "cluster_secret": "s" * 24}
    )  # the file is on the nodes only
    assert (read.max_batch, read.probe_latency_interval, read.request_timeout) == (16, 0, 2.5)


def test_plan_sorts_by_rank_and_is_json() -> None:
    hosts, group = four_mac_ring()
    shuffled = {name: hosts[name] for name in ["mac3", "mac1", "mac4", "mac2"]}
    plan = cluster_plan(shuffled, group)
    assert plan["ranks"] == ["mac1", "mac2", "mac3", "mac4"]
    assert [h["ssh"] for h in plan["hostfile"]["hosts"]] == ["mac1.local", "mac2.local", "mac3.local", "mac4.local"]
    assert json.loads(json.dumps(plan)) == plan


def test_plan_refuses_a_bad_inventory() -> None:
    hosts, group = two_macs()
    hosts["mac2"]["cluster_rdma"] = [None, None]
    with pytest.raises(ValueError, match=r"mac2: cluster_rdma\[0\]"):
        cluster_plan(hosts, group)


def test_plan_does_not_share_inventory_lists() -> None:
    hosts, group = two_macs()
    before = copy.deepcopy(hosts)
    plan = cluster_plan(hosts, group)
    plan["hosts"]["mac1"]["ips"].append("x")
    plan["hosts"]["mac1"]["files"]["mlx-jaccl-cluster/ibv_devices.json"][0][1] = "x"
    assert hosts == before


def test_plan_paths_may_differ_per_host() -> None:
    hosts, group = two_macs()
    hosts["mac2"].update(
        cluster_install_prefix="/Users/bob/mlx-jaccl-cluster", cluster_model_path="/Users/bob/models/m"
    )
    assert validate_cluster(hosts, group) == []
    mac1, mac2 = (cluster_plan(hosts, group)["hosts"][name] for name in ("mac1", "mac2"))
    assert mac1["env"]["MJC_MODEL"] == MODEL["cluster_model_path"] and mac1["prefix"] == PREFIX
    assert mac2["env"]["MJC_MODEL"] == "/Users/bob/models/m"
    assert mac2["env"]["MLX_IBV_DEVICES"] == "/Users/bob/mlx-jaccl-cluster/etc/mlx-jaccl-cluster/ibv_devices.json"
    assert mac2["argv"] == ["/Users/bob/mlx-jaccl-cluster/venv/bin/mjc-rank"]


# --- the Ansible filter plugin ------------------------------------------------------------------


@pytest.fixture(scope="module")
def filters() -> dict[str, Callable]:
    pytest.importorskip("ansible")
    path = Path(__file__).resolve().parents[2] / "plugins" / "filter" / "cluster_inventory.py"
    spec = importlib.util.spec_from_file_location("mjc_cluster_inventory_filter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FilterModule().filters()


def test_filter_takes_hostvars_with_group_vars_merged_in(filters: dict[str, Callable]) -> None:
    hosts, group = two_macs()
    merged = {name: {**group, **variables, "ansible_connection": "ssh"} for name, variables in hosts.items()}
    assert filters["mjc_validate_cluster"](merged) == []
    assert filters["mjc_cluster_plan"](merged)["hosts"]["mac2"]["env"]["MLX_RANK"] == "1"
    merged["mac2"]["cluster_api_port"] = 9000
    assert filters["mjc_validate_cluster"](merged) == [
        "mac2: cluster_api_port: is the number 9000 on this host but the number 8080 for the group — "
        "set cluster_api_port once in group_vars/mlx_cluster and remove it from host mac2"
    ]


def test_a_secret_is_never_shown() -> None:
    hosts, group = two_macs()
    group["cluster_secret"] = "short-secret"
    hosts["mac2"]["cluster_secret"] = "another-secret-0123456789"
    listing = "\n".join(map(str, validate_cluster(hosts, group)))
    assert "cluster_secret" in listing and "short-secret" not in listing and "another-secret" not in listing


def test_plan_names_the_values_roles_read_once() -> None:
    """Roles read these from the plan, never from cluster_* (prefix, caches, name, model, URLs)."""
    hosts, group = local_ring()
    plan = cluster_plan(hosts, group, default_name="lab")
    assert plan["name"] == "lab"  # the inventory folder's name, given by preflight
    assert plan["controller_cache"] == str(Path.home() / ".cache" / "mlx-jaccl-cluster")
    assert plan["model"]["dir"] == f"{plan['controller_cache']}/models/SmolLM2-135M-Instruct"
    assert (plan["mlx_extra"], plan["uninstall_models"], plan["sensitive"]) == ("auto", False, False)
    assert plan["macos_min"] == "26.2" and plan["runtime_settings"] == {}
    entry = plan["hosts"]["rank0"]
    assert (entry["prefix"], entry["python"], entry["service_manager"]) == (PREFIX, "/usr/bin/python3", "auto")
    assert entry["model_path"] == entry["env"]["MJC_MODEL"] == MODEL["cluster_model_path"]
    assert "service_user" not in entry
    group.update(
        cluster_name="prod",
        cluster_controller_cache="/srv/cache",
        cluster_uninstall_models="true",  # -e cluster_uninstall_models=true gives a string
        cluster_secret="0123456789abcdef0123",
        cluster_model_source="local",
        cluster_model_local_path="/data/smol",
    )
    plan = cluster_plan(hosts, group, default_name="lab")
    assert (plan["name"], plan["controller_cache"], plan["uninstall_models"]) == ("prod", "/srv/cache", True)
    assert plan["model"]["dir"] == "/data/smol" and plan["sensitive"] is True


@pytest.mark.parametrize(
    ("bind", "remote", "local"),
    [
        ("0.0.0.0", "http://mac1.local:8080", "http://127.0.0.1:8080"),
        ("::", "http://mac1.local:8080", "http://127.0.0.1:8080"),
        ("127.0.0.1", "http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("localhost", "http://localhost:8080", "http://127.0.0.1:8080"),
        ("192.168.1.14", "http://192.168.1.14:8080", "http://192.168.1.14:8080"),
        ("::1", "http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_where_rank_0_answers_is_derived_once(bind, remote, local) -> None:
    """api_url: from the controller (a wildcard bind is reached at rank 0's ssh target);
    local_api_url: on rank 0's machine (the service role's /health wait and smoke question)."""
    hosts, group = two_macs()
    plan = cluster_plan(hosts, group | {"cluster_api_host": bind})
    assert (plan["api_url"], plan["local_api_url"]) == (remote, local)


def test_the_api_port_default_is_the_runtime_settings_own() -> None:
    from mlx_jaccl_cluster.ops.schema import GROUP_DEFAULTS
    from mlx_jaccl_cluster.settings import Settings

    assert GROUP_DEFAULTS["cluster_api_port"] == Settings.model_fields["api_port"].default
