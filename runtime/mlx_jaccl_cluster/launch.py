"""Start a group of ranks on this machine by hand, the way a service manager would.

Each rank is its own ``mjc-rank`` process with ``MLX_RANK`` and a ring hostfile on
loopback; no ``mlx.launch`` (it spends most of a core relaying output). Used by the tests,
the benchmarks, and anyone trying the runtime without provisioning:

    python -m mlx_jaccl_cluster.launch --model PATH --world 2 [-- extra mjc-rank flags]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .settings import Settings, settings_env

#: every rank of a local group, its control channel and its API listen here
LOOPBACK = "127.0.0.1"


def write_secret(path: Path) -> Path:
    """A fresh cluster secret in ``path``, readable by this account only (MJC_CLUSTER_SECRET_FILE)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(24) + "\n")
    return path


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct TCP ports that are free right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalGroup:
    """A group of rank processes and the URL of rank 0's API."""

    procs: list[subprocess.Popen | None]
    logs: list[Path]
    api: str
    model_id: str
    api_key: str | None = None
    env: dict = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.api + path

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def rank_env(self, rank: int) -> dict:
        return self.env | {"MLX_RANK": str(rank)}

    def spawn(self, rank: int) -> subprocess.Popen:
        """Start (or restart) one rank; its output goes to its log file."""
        proc = subprocess.Popen(
            self.argv, env=self.rank_env(rank), stdout=self.logs[rank].open("a"), stderr=subprocess.STDOUT
        )
        self.procs[rank] = proc
        return proc

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.log(r)[-4000:]}" for r in range(len(self.procs)))

    def health(self) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:  # a 503 while loading: its body may be slow to come on a busy machine
                return exc.code, json.loads(exc.read() or b"{}")
            except (OSError, ValueError):
                return exc.code, {}
        except OSError as exc:
            return 0, repr(exc)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Block until /health is 200; raise with every rank's log if a rank exits first."""
        deadline = time.monotonic() + timeout
        last: dict | str = ""
        while time.monotonic() < deadline:
            for rank, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(
                        f"rank {rank} exited with {p.returncode} before the group was ready\n{self.all_logs()}"
                    )
            status, last = self.health()
            if status == 200 and isinstance(last, dict):
                return last
            time.sleep(0.2)
        raise RuntimeError(f"group not ready after {timeout} s (last /health: {last})\n{self.all_logs()}")

    def stop(self) -> None:
        procs = [p for p in self.procs if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_group(
    model: Path,
    world: int,
    workdir: Path,
    *,
    parallel: str = "auto",
    split: list[int] | None = None,
    args: tuple[str, ...] = (),
    env: dict | None = None,
    order: list[int] | None = None,
    delay: float = 0.0,
    api_key: str | None = None,
    api_port: int | None = None,
    group_class: type[LocalGroup] = LocalGroup,
) -> LocalGroup:
    """Start ``world`` ranks (those in ``order``, in that order, ``delay`` s apart)."""
    workdir.mkdir(parents=True, exist_ok=True)
    control_port, picked_api, *ring_ports = free_ports(2 + world)
    api_port = api_port or picked_api
    hostfile = workdir / "hostfile.json"
    hostfile.write_text(json.dumps([[f"{LOOPBACK}:{p}"] for p in ring_ports]))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MJC_"))}
    base |= {"MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1"}
    base |= settings_env(
        backend="ring",
        parallel=parallel,
        model=model,
        control=f"{LOOPBACK}:{control_port}",
        cluster_secret_file=write_secret(workdir / "cluster-secret"),
        api_host=LOOPBACK,
        api_port=api_port,
        api_key=api_key or None,
        pipeline_split=split or None,
    )
    base |= env or {}
    group = group_class(
        procs=[None] * world,
        logs=[workdir / f"rank{r}.log" for r in range(world)],
        api=f"http://{LOOPBACK}:{api_port}",
        model_id=Path(model).name,
        api_key=api_key,
        env=base,
        argv=[sys.executable, "-m", "mlx_jaccl_cluster.main", *args],
    )
    for i, rank in enumerate(order if order is not None else range(world)):
        if i and delay:
            time.sleep(delay)
        group.spawn(rank)
    return group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_jaccl_cluster.launch",
        description="Start N ranks on this machine over MLX ring on loopback.",
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--parallel", choices=["auto", "tensor", "pipeline"], default="auto")
    parser.add_argument(
        "--split",
        type=lambda v: [int(n) for n in v.split(",")],
        default=None,
        help="pipeline layers per rank, e.g. 10,20 (default: even)",
    )
    parser.add_argument("--api-port", type=int, default=Settings.default("api_port"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mjc-launch"))
    parser.add_argument("rank_args", nargs="*", help="extra mjc-rank flags (after --)")
    opts = parser.parse_args(argv)
    group = start_group(
        opts.model,
        opts.world,
        opts.workdir,
        parallel=opts.parallel,
        split=opts.split,
        args=tuple(opts.rank_args),
        api_port=opts.api_port,
    )
    try:
        print(json.dumps(group.wait_ready()), flush=True)
        print(f"serving {group.api}  (logs: {opts.workdir}/rank*.log; Ctrl-C stops every rank)", flush=True)
        while all(p is None or p.poll() is None for p in group.procs):
            time.sleep(0.5)
        print("a rank exited:\n" + group.all_logs(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        group.stop()


if __name__ == "__main__":
    sys.exit(main())
