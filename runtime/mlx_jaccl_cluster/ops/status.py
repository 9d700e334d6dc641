"""The cluster at a glance: every node's probe and rank 0's /health -> one table and a verdict.

``playbooks/status.yml`` gathers :mod:`mlx_jaccl_cluster.ops.node_probe` output from every rank
and rank 0's ``/health`` into one JSON document, then runs on the controller::

    python -m mlx_jaccl_cluster.ops.status --input status.json

It prints the table and what is unhealthy, and exits 1 when anything is (0 otherwise), so
monitoring can run it. Input: ``{"world_size": N, "api_url": URL, "health": {"status":
HTTP status or 0, "json": body or null}, "nodes": {host: {"rank", "ssh", "probe" (or
null), "error"}}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .macos import MIN_MACOS
from .report import text_table

# Less free disk than this on a node's install prefix is a problem.
MIN_FREE_BYTES = 2 * 1024**3
VERSION_KEYS = ("mlx", "mlx-lm", "mlx-jaccl-cluster", "wheelhouse")
HEADERS = [
    "rank",
    "host",
    "os",
    "chip",
    "memory",
    "rdma",
    "service",
    "pid",
    "uptime",
    "model",
    "mlx",
    "mlx-lm",
    "runtime",
    "disk free",
]


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f} GiB"


def duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d" if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _rdma_cell(ports: list[dict]) -> str:
    if not ports:
        return "-"
    return " ".join(
        f"{p['device']}:{'up' if p['state'] == 'PORT_ACTIVE' else 'DOWN'}"
        + (f"@{p['gbps']:g}" if p.get("gbps") else "")
        for p in ports
    )


def _model_cell(model: dict) -> str:
    """``verified`` / ``MISMATCH`` / ``missing``, after the node's pipeline share when it
    holds one: ``share 3 of 7 files (layers 0-11), verified``."""
    state = "missing" if not model["present"] else "verified" if model["verified"] else "MISMATCH"
    return f"{model['label']}, {state}" if model.get("label") else state


def node_row(host: str, node: dict) -> list[Any]:
    probe = node.get("probe")
    if not probe:
        return [node["rank"], host, "unreachable" if node.get("unreachable") else "-", *["-"] * 11]
    service, versions = probe["service"], probe["versions"]
    return [
        node["rank"],
        host,
        f"{probe['os']} {probe['os_version']}",
        probe["chip"],
        gib(probe["memory_bytes"]),
        _rdma_cell(probe["rdma"]),
        f"{service['manager']}:{service['state']}",
        service["pid"] or "-",
        duration(service["uptime_s"]),
        _model_cell(probe["model"]),
        versions["mlx"] or "-",
        versions["mlx-lm"] or "-",
        versions["mlx-jaccl-cluster"] or "-",
        gib(probe["disk_free_bytes"]),
    ]


def node_problems(host: str, node: dict) -> list[str]:
    """What is wrong on one node (empty when it is healthy)."""
    probe = node.get("probe")
    if not probe:
        return [f"{host}: {node.get('error') or 'no probe result'}"]
    found = []
    service = probe["service"]
    if not service["running"]:
        found.append(f"{host}: rank {node['rank']} is not running ({service['manager']} says {service['state']})")
    if not probe["model"]["verified"]:
        share = f" ({probe['model']['label']})" if probe["model"].get("label") else ""
        found.append(f"{host}: model not verified: {'; '.join(probe['model']['problems']) or 'missing'}{share}")
    for port in probe["rdma"]:
        if port["state"] != "PORT_ACTIVE" and port["device"] in node.get("rdma_devices", []):
            found.append(f"{host}: {port['device']} is {port['state']}, not PORT_ACTIVE (check the cable)")
    if (
        probe["system"] == "Darwin"
        and tuple(int(x) for x in probe["os_version"].split(".")[:2] if x.isdigit()) < MIN_MACOS
    ):
        found.append(f"{host}: macOS {probe['os_version']} is older than {'.'.join(map(str, MIN_MACOS))} (no RDMA)")
    if probe["disk_free_bytes"] < MIN_FREE_BYTES:
        found.append(f"{host}: only {gib(probe['disk_free_bytes'])} free on the install prefix")
    return found


def version_drift(nodes: dict[str, dict]) -> list[str]:
    """A version that is not the same on every node that answered."""
    found = []
    probes = {h: n["probe"] for h, n in nodes.items() if n.get("probe")}
    for key in VERSION_KEYS:
        seen: dict[Any, list[str]] = {}
        for host, probe in probes.items():
            seen.setdefault(probe["versions"].get(key), []).append(host)
        if len(seen) > 1:
            found.append(
                f"version drift in {key}: "
                + "; ".join(f"{v or 'missing'} on {', '.join(hs)}" for v, hs in seen.items())
            )
    return found


def _http_status(health: dict) -> int | None:
    """The HTTP status rank 0 answered; None when nothing answered (Ansible's uri says -1)."""
    try:  # ansible-core before 2.19 renders templated numbers as strings
        status = int(health.get("status"))
    except (TypeError, ValueError):
        return None
    return status if status > 0 else None


def cluster_problems(doc: dict) -> list[str]:
    health, world = doc.get("health") or {}, int(doc["world_size"])
    body = health.get("json") or {}
    if _http_status(health) != 200:
        detail = body.get("detail") or body.get("status") or health.get("msg") or "no answer"
        return [f"rank 0 /health at {doc.get('api_url')} answered {_http_status(health) or 'nothing'}: {detail}"]
    if body.get("ranks_up") != world:
        return [f"rank 0 sees {body.get('ranks_up')} of {world} ranks up"]
    return []


def cluster_line(doc: dict) -> str:
    health = doc.get("health") or {}
    body = health.get("json") or {}
    return (
        f"cluster: {doc.get('api_url')}/health {_http_status(health) or 'no answer'} "
        f"({body.get('status', '-')}), ranks up {body.get('ranks_up', '-')}/{doc['world_size']}, "
        f"queue depth {body.get('queue_depth', '-')}, active {body.get('active', '-')}, "
        f"model {body.get('model', '-')}, backend {body.get('backend', '-')}"
    )


def evaluate(doc: dict) -> tuple[str, list[str]]:
    """The printed report and every problem found."""
    nodes = dict(sorted(doc["nodes"].items(), key=lambda item: item[1]["rank"]))
    problems = [p for host, node in nodes.items() for p in node_problems(host, node)]
    problems += version_drift(nodes) + cluster_problems(doc)
    text = text_table(HEADERS, [node_row(host, node) for host, node in nodes.items()]) + "\n" + cluster_line(doc)
    verdict = "healthy" if not problems else "UNHEALTHY:\n" + "\n".join(f"- {p}" for p in problems)
    return f"{text}\n{verdict}", problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_jaccl_cluster.ops.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True)
    opts = p.parse_args(argv)
    text, problems = evaluate(json.loads(opts.input.read_text()))
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
