"""One read-only look at a node, for ``playbooks/status.yml``: prints one JSON object.

Run on the node with the cluster venv's Python (so the versions are the ones the ranks
import)::

    PREFIX/venv/bin/python -m mlx_jaccl_cluster.ops.node_probe --manager systemd \\
        --unit mlx-jaccl-cluster-rank0 --prefix PREFIX --model PATH --manifest PATH

The parsers of ``supervisorctl status``, ``systemctl show``, ``launchctl print`` and
``ps -o etime=`` are plain functions (tested with captured output); :func:`collect`
runs the tools. Nothing here changes anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from . import macos, manifest

PACKAGES = ("mlx", "mlx-lm", "mlx-jaccl-cluster")
_ETIME = re.compile(r"^(?:(?:(\d+)-)?(\d+):)?(\d+):(\d+)$")
_SUPERVISOR = re.compile(r"^(\S+)\s+([A-Z]+)\s*(.*)$")
_SUPERVISOR_PID = re.compile(r"pid (\d+)")
_LAUNCHD_KV = re.compile(r"^\s*(state|pid|last exit code)\s*=\s*(.+?)\s*$", re.MULTILINE)


def parse_etime(text: str) -> int | None:
    """``ps -o etime=`` (``[[dd-]hh:]mm:ss``) -> seconds; None when it is not one."""
    found = _ETIME.match(text.strip())
    if not found:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_supervisor_status(text: str) -> dict[str, Any]:
    """``supervisorctl status UNIT``: ``{"state": "RUNNING", "pid": 1234}`` (pid None unless running)."""
    for line in text.splitlines():
        found = _SUPERVISOR.match(line.strip())
        if found and found.group(2).isupper():
            pid = _SUPERVISOR_PID.search(found.group(3))
            return {"state": found.group(2), "pid": int(pid.group(1)) if pid else None}
    return {"state": "unknown", "pid": None}


def parse_systemctl_show(text: str) -> dict[str, Any]:
    """``systemctl --user show UNIT -p ActiveState,SubState,MainPID,LoadState``."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    pid = int(values.get("MainPID", "0") or 0)
    state = values.get("ActiveState", "unknown")
    if values.get("LoadState") == "not-found":
        state = "not-installed"
    return {
        "state": f"{state}/{values['SubState']}" if values.get("SubState") and state != "not-installed" else state,
        "pid": pid or None,
    }


def parse_launchctl_print(text: str) -> dict[str, Any]:
    """``launchctl print gui/UID/LABEL``: its ``state`` and ``pid`` lines (top-level block)."""
    values: dict[str, str] = {}
    for key, value in _LAUNCHD_KV.findall(text):
        values.setdefault(key, value)
    pid = values.get("pid", "")
    return {"state": values.get("state", "unknown"), "pid": int(pid) if pid.isdigit() else None}


RUNNING_STATES = {"RUNNING", "active/running", "running"}


def _run(argv: list[str], timeout: float = 15) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def service_state(manager: str, unit: str, prefix: str, label: str) -> dict[str, Any]:
    """State, PID and uptime of one rank under its service manager."""
    if manager == "supervisord":
        conf = f"{prefix}/etc/supervisord.conf"
        if not Path(conf).exists():
            return {"state": "not-installed", "pid": None, "running": False, "uptime_s": None}
        rc, out = _run([f"{prefix}/venv/bin/supervisorctl", "-c", conf, "status", unit])
        state = (
            parse_supervisor_status(out)
            if "refused" not in out and "no such file" not in out.lower()
            else {"state": "supervisord-down", "pid": None}
        )
    elif manager == "systemd":
        _, out = _run(
            ["systemctl", "--user", "show", f"{unit}.service", "-p", "ActiveState,SubState,MainPID,LoadState"]
        )
        state = parse_systemctl_show(out)
    elif manager == "launchd":
        rc, out = _run(["launchctl", "print", f"gui/{os.getuid()}/{label}"])
        state = parse_launchctl_print(out) if rc == 0 else {"state": "not-loaded", "pid": None}
    else:
        raise ValueError(f"unknown service manager {manager!r}")
    state["running"] = state["state"] in RUNNING_STATES and state["pid"] is not None
    state["uptime_s"] = None
    if state["pid"]:
        _, out = _run(["ps", "-o", "etime=", "-p", str(state["pid"])])
        state["uptime_s"] = parse_etime(out)
    return state


def _first_line(argv: list[str]) -> str:
    rc, out = _run(argv)
    return out.strip().splitlines()[0] if rc == 0 and out.strip() else ""


def platform_info() -> dict[str, Any]:
    """OS and version, chip and memory."""
    system = platform.system()
    if system == "Darwin":
        os_name, version = "macOS", platform.mac_ver()[0]
        chip = _first_line(["sysctl", "-n", "machdep.cpu.brand_string"])
    else:
        try:
            release = platform.freedesktop_os_release()
            os_name, version = release.get("NAME", system), release.get("VERSION_ID", platform.release())
        except OSError:
            os_name, version = system, platform.release()
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        chip = found.group(1).strip() if found else platform.machine()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "system": system,
        "os": os_name,
        "os_version": version,
        "chip": chip,
        "memory_bytes": memory,
        "cpus": os.cpu_count(),
    }


def rdma_ports() -> list[dict[str, Any]]:
    """Every RDMA device with its first port's state and link speed (macOS; ibv_devinfo -v)."""
    rc, out = _run(["ibv_devinfo", "-v"])
    if rc != 0:
        return []
    ports = []
    for name, device in sorted(macos.parse_ibv_devinfo(out).items()):
        port = next(iter(device["ports"].values()), {})
        ports.append({"device": name, "state": port.get("state") or "no port", "gbps": macos.port_link_gbps(port)})
    return ports


def model_state(path: str, manifest_path: str) -> dict[str, Any]:
    """Whether the model folder is there and matches the manifest the controller wrote; for a
    node that holds a pipeline share, ``share``: ``{"files", "of_files", "layers"}`` (its
    manifest's count, the whole model's, its stages' ``[start, end)``) and ``label``
    (``"share 3 of 7 files (layers 0-11)"``); both None for a whole copy."""
    unreadable = f"manifest {manifest_path} is not a JSON object"
    try:
        wanted = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError) as exc:
        wanted, unreadable = None, f"no manifest: {exc}"
    if not isinstance(wanted, dict):
        wanted = None
    share = label = None
    if wanted is not None and "of_files" in wanted:
        share = {"files": len(wanted.get("files", {})), "of_files": wanted["of_files"], "layers": wanted.get("layers")}
        label = manifest.share_label(wanted)
    state: dict[str, Any] = {"share": share, "label": label}
    if not Path(path).is_dir():
        return state | {"present": False, "verified": False, "problems": [f"{path} is missing"]}
    if wanted is None:
        return state | {"present": True, "verified": False, "problems": [unreadable]}
    problems = manifest.problems(Path(path), wanted, rehash=False)  # status changes nothing and hashes nothing
    return state | {"present": True, "verified": not problems, "problems": problems[:5]}


def versions(prefix: str) -> dict[str, Any]:
    """mlx, mlx-lm and runtime versions as this interpreter imports them, and the installed wheelhouse."""
    found: dict[str, Any] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        found["wheelhouse"] = json.loads(Path(f"{prefix}/venv/.mjc-wheelhouse-stamp.json").read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        found["wheelhouse"] = None
    return found


def disk_free(path: str) -> int:
    """Free bytes on the file system holding ``path`` (its deepest existing parent)."""
    target = Path(path)
    while not target.exists():
        target = target.parent
    return shutil.disk_usage(target).free


def collect(opts: argparse.Namespace) -> dict[str, Any]:
    info = platform_info()
    return {
        **info,
        "rdma": rdma_ports() if info["system"] == "Darwin" else [],
        "service": {
            "manager": opts.manager,
            "unit": opts.unit,
            **service_state(opts.manager, opts.unit, opts.prefix, opts.label),
        },
        "model": model_state(opts.model, opts.manifest),
        "versions": versions(opts.prefix),
        "disk_free_bytes": disk_free(opts.prefix),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_jaccl_cluster.ops.node_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--manager", required=True, choices=["supervisord", "systemd", "launchd"])
    p.add_argument("--unit", required=True)
    p.add_argument("--label", default="", help="launchd label")
    p.add_argument("--prefix", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    print(json.dumps(collect(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
