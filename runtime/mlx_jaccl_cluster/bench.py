"""``mjc-bench``: the link and collective sweep, run on every rank of the cluster at once.

Started per rank by ``playbooks/bench.yml`` with the service's own environment
(``MLX_RANK``, ``MJC_BACKEND`` and the backend's rank files, exactly as the service
manager starts ``mjc-rank``), while the service is stopped. Every figure comes from
:mod:`mlx_jaccl_cluster.engine.collectives` (timed and checked); each all_sum size is
also timed with :func:`bare_all_sum_times`, a deliberately minimal MLX loop, in
interleaved rounds of the same run, so the report can show that the bench adds nothing.

Rank 0 writes one JSON document (``--out``, or stdout); other ranks only take part.

A collective whose peer died can wait forever, so a watchdog runs beside MLX (on rank 0's
control address, free while the service is stopped, authenticated and sealed with the
cluster secret like the control channel): every rank joins it before the MLX group forms
and sends a heartbeat each second. When a rank's connection drops or it
misses heartbeats for ``--peer-timeout`` seconds, every survivor exits (status 3) naming
the lost rank, instead of hanging until the playbook's task timeout.

    MLX_RANK=0 MLX_HOSTFILE=hostfile.json MJC_BACKEND=ring mjc-bench --out /tmp/link.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import select
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from . import cluster
from .layout import NO_SEND_RECV
from .ops.apibench import percentile

KB, MB = 1024, 1024 * 1024
DEFAULT_SIZES = [4 * KB, 16 * KB, 64 * KB, 256 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]


def parse_size(text: str) -> int:
    """``4K``, ``16M``, ``1G`` or a plain number of bytes -> bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": KB, "M": MB, "G": 1024 * MB}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4K, 16M or 4096")
    return int(number) * scale


def iterations(nbytes: int, budget_bytes: int, least: int, most: int) -> int:
    """Iterations for one round of one size: about ``budget_bytes`` moved, within [least, most]."""
    return max(least, min(most, budget_bytes // nbytes))


def summary(samples: list[float], nbytes: int | None = None) -> dict:
    """Median, p99, mean and min of seconds per iteration; bandwidths when ``nbytes`` is given."""
    out = {
        "iters": len(samples),
        "median_s": statistics.median(samples),
        "p99_s": percentile(samples, 99),
        "mean_s": statistics.fmean(samples),
        "min_s": min(samples),
    }
    if nbytes:
        out |= {
            "avg_gbps": nbytes * 8 / out["mean_s"] / 1e9,
            "median_gbps": nbytes * 8 / out["median_s"] / 1e9,
            "peak_gbps": nbytes * 8 / out["min_s"] / 1e9,
        }
    return out


def bare_all_sum_times(group, nbytes: int, iters: int, warmup: int = 2) -> list[float]:
    """The plainest MLX all_sum loop (no checks), timed the same way: the reference figure."""
    import mlx.core as mx

    x = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    samples = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


LOST_EXIT = 3  # the exit status of a rank that gave up on a lost peer


class Watchdog:
    """Heartbeats between rank 0 and every other rank, beside MLX; exits the process on a lost peer.

    Rank 0 listens on ``address`` and accepts only ``allowed_ips``; every connection first
    proves the cluster secret both ways (the control channel's own handshake,
    :func:`cluster.prove_to_follower`), then rank ``r`` says ``r hostname`` and each side
    sends a heartbeat a second, every frame sealed as on the control channel. A closed
    connection (the peer's process is gone), ``timeout`` seconds of silence (its host is
    gone) or a frame that fails its check makes this rank print who was lost and
    ``os._exit``; rank 0 first tells the followers who it lost, so they name it too. A
    process without the secret can neither join nor end the sweep by speaking.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        address: str,
        timeout: float = 10.0,
        join_timeout: float = 120.0,
        exit=os._exit,
        *,
        secret: bytes,
        allowed_ips: list[str] | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.rank, self.world, self.addr = rank, world, (host, int(port))
        self.timeout, self.join_timeout, self._exit = timeout, join_timeout, exit
        self.secret = secret
        self.allowed_ips = set(allowed_ips or [host])
        self.peers: dict[int, str] = {}  # rank -> hostname, as they joined
        self.conns: list[socket.socket] = []  # one per watched peer
        self._seals: dict[socket.socket, tuple[cluster.Seal, threading.Lock]] = {}
        self._stopped = threading.Event()

    def _send(self, conn: socket.socket, kind: int, payload: bytes = b"") -> None:
        seal, lock = self._seals[conn]
        with lock:
            cluster.send_frame(conn, kind, payload, seal)

    def lost(self, why: str) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        print(
            f"[mjc-bench] rank {self.rank}: {why}; giving up the sweep (exit {LOST_EXIT})", file=sys.stderr, flush=True
        )
        if self.rank == 0:  # tell the followers who was lost, so they name it too (not just "rank 0")
            for conn in self.conns:
                try:
                    self._send(conn, cluster.FAIL, why.encode())
                except OSError:
                    pass
        self._exit(LOST_EXIT)

    def wait_for_loss(self, seconds: float) -> None:
        """After MLX failed (its own error for a closed peer): let the watchdog name the lost
        rank and exit first, if it is about to. Returns when it does not."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stopped.is_set():
            time.sleep(0.05)
        time.sleep(0.5 if self._stopped.is_set() else 0)  # the exit is under way

    def stop(self) -> None:
        """The sweep is over: closing connections is no longer a loss."""
        self._stopped.set()

    def start(self) -> None:
        """Return once every rank has joined (rank 0) or this rank has joined rank 0; then watch in threads."""
        if self.world < 2:
            return
        if self.rank == 0:
            self._lead()
        else:
            self._follow()

    def _admit(self, conn: socket.socket, ip: str) -> tuple[int, str, cluster.Seal] | None:
        """(rank, hostname, seal) of a rank that proved the secret and said who it is, or None."""
        conn.settimeout(cluster.HANDSHAKE_TIMEOUT)
        try:
            seal = cluster.prove_to_follower(conn, self.secret)
            kind, payload = cluster.recv_frame(conn, cluster.AUTH_FRAME_MAX, seal)
            rank, _, host = payload.decode().partition(" ")
            if kind != cluster.HELLO or not 0 < int(rank) < self.world or int(rank) in self.peers:
                raise ValueError(f"not a rank this sweep waits for: {payload[:40]!r}")
        except (cluster.AuthFailed, cluster.ChannelClosed, OSError, ValueError) as exc:
            print(f"[mjc-bench] dropped a watchdog connection from {ip}: {exc}", file=sys.stderr, flush=True)
            conn.close()
            return None
        return int(rank), host or "?", seal

    def _lead(self) -> None:
        server = socket.create_server(self.addr, reuse_port=False)
        server.settimeout(1.0)
        deadline = time.monotonic() + self.join_timeout
        conns: dict[int, socket.socket] = {}
        while len(conns) < self.world - 1:
            if time.monotonic() > deadline:
                missing = ", ".join(str(r) for r in range(1, self.world) if r not in conns)
                self.lost(f"rank(s) {missing} did not join within {self.join_timeout:.0f} s")
                return
            try:
                conn, (ip, *_) = server.accept()
            except TimeoutError:
                continue
            if ip not in self.allowed_ips:
                print(f"[mjc-bench] refused a watchdog connection from {ip}: not a configured peer", file=sys.stderr)
                conn.close()
                continue
            joined = self._admit(conn, ip)
            if joined is not None:
                rank, host, seal = joined
                conns[rank], self.peers[rank] = conn, host
                self._seals[conn] = (seal, threading.Lock())
        server.close()
        for rank, conn in conns.items():
            self._watch(conn, f"rank {rank} ({self.peers[rank]})")

    def _follow(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        while True:
            conn = None
            try:
                conn = socket.create_connection(self.addr, timeout=self.timeout)
                conn.settimeout(cluster.HANDSHAKE_TIMEOUT)
                seal = cluster.prove_to_leader(conn, self.secret)
                break
            except (cluster.AuthFailed, cluster.ChannelClosed, OSError) as exc:
                if conn is not None:
                    conn.close()
                if time.monotonic() > deadline:
                    self.lost(
                        f"rank 0 at {self.addr[0]}:{self.addr[1]} did not answer and prove the cluster secret "
                        f"within {self.join_timeout:.0f} s ({exc})"
                    )
                    return
                time.sleep(0.5)
        self._seals[conn] = (seal, threading.Lock())
        self._send(conn, cluster.HELLO, f"{self.rank} {socket.gethostname()}".encode())
        self._watch(conn, f"rank 0 ({self.addr[0]})")

    def _watch(self, conn: socket.socket, who: str) -> None:
        self.conns.append(conn)
        conn.settimeout(self.timeout)  # a frame that starts must end within it
        seal, _ = self._seals[conn]

        def beat() -> None:
            while not self._stopped.wait(1.0):
                try:
                    self._send(conn, cluster.BEAT)
                except OSError:
                    break

        def listen() -> None:
            while not self._stopped.is_set():
                try:
                    if not select.select([conn], [], [], self.timeout)[0]:
                        self.lost(f"{who} sent no heartbeat for {self.timeout:.0f} s (its host is down or unreachable)")
                        return
                    kind, payload = cluster.recv_frame(conn, cluster.HELLO_FRAME_MAX, seal)
                except cluster.FrameRefused as exc:
                    self.lost(f"refused a frame from {who} ({exc})")
                    return
                except (cluster.ChannelClosed, OSError, ValueError) as exc:
                    if "connection closed" in str(exc):
                        self.lost(f"lost {who}: its connection closed (the process died or was killed)")
                    else:
                        self.lost(f"lost {who}: {exc}")
                    return
                if kind == cluster.FAIL:  # rank 0 names the rank it lost
                    self.lost(f"{who} reports: " + payload.decode(errors="replace"))
                    return

        for target in (beat, listen):
            threading.Thread(target=target, daemon=True, name=f"watchdog {who}").start()


def init_group():
    """The MLX group, from the same environment and backend files the service uses."""
    import mlx.core as mx

    from .settings import mlx_backend_name

    backend = os.environ.get("MJC_BACKEND", "ring")
    if backend == "jaccl-ring":
        os.environ["MLX_JACCL_RING"] = "1"
    return mx.distributed.init(backend=mlx_backend_name(backend), strict=True)


def _all_sum_sweep(group, opts, log) -> list[dict]:
    from .engine import collectives

    rows = []
    for nbytes in opts.sizes:
        n = iterations(nbytes, opts.budget, opts.min_iters, opts.max_iters)
        checked: list[float] = []
        bare: list[float] = []
        for _ in range(opts.rounds):  # interleaved, so drift hits both alike
            checked += collectives.all_sum_times(group, nbytes, n)
            bare += bare_all_sum_times(group, nbytes, n)
        row = {"bytes": nbytes, **summary(checked, nbytes), "bare": summary(bare, nbytes)}
        row["overhead_pct"] = (row["median_s"] / row["bare"]["median_s"] - 1) * 100
        rows.append(row)
        log(
            f"all_sum {nbytes:>10} B  {row['median_s'] * 1e6:10.1f} us  {row['avg_gbps']:8.3f} Gb/s avg"
            f"  {row['peak_gbps']:8.3f} Gb/s peak  bare {row['bare']['median_s'] * 1e6:10.1f} us"
        )
    return rows


def _all_gather_sweep(group, opts) -> list[dict]:
    from .engine import collectives

    rows = []
    for nbytes in opts.gather_sizes:
        n = iterations(nbytes * group.size(), opts.budget, opts.min_iters, opts.max_iters)
        rows.append({"bytes": nbytes, **summary(collectives.all_gather_times(group, nbytes, n), nbytes * group.size())})
    return rows


def _pair_sweep(group, opts) -> list[dict]:
    """send/recv between every ordered pair; the receiver's median reaches rank 0 by an all_sum."""
    import mlx.core as mx

    from .engine import collectives

    pairs = list(itertools.permutations(range(group.size()), 2))
    n = iterations(opts.pair_size, opts.budget, opts.min_iters, opts.max_iters)
    mine = []
    for src, dst in pairs:
        samples = collectives.send_recv_times(group, src, dst, opts.pair_size, n)
        mine.append(statistics.median(samples) if samples and group.rank() == dst else 0.0)
    medians = mx.distributed.all_sum(mx.array(mine, dtype=mx.float32), group=group).tolist()
    return [
        {
            "src": src,
            "dst": dst,
            "bytes": opts.pair_size,
            "iters": n,
            "median_s": t,
            "median_gbps": opts.pair_size * 8 / t / 1e9 if t > 0 else None,
        }
        for (src, dst), t in zip(pairs, medians)
    ]


def pairs_not_timed(backend: str, world: int, wanted: bool) -> str | None:
    """Why the asked-for send/recv pairs cannot be timed: a backend without point-to-point
    send/recv (nccl, ``layout.NO_SEND_RECV``) would fail the whole sweep on the first pair,
    so the sweep says so instead. None when they are timed (or not asked for)."""
    return NO_SEND_RECV.get(backend) if wanted and world > 1 else None


def link_sweep(group, opts, log=lambda _msg: None) -> dict:
    """Every measurement of one run, as rank 0 reports it."""
    from .engine import collectives

    started = time.time()
    backend = os.environ.get("MJC_BACKEND", "ring")
    pairs_skipped = pairs_not_timed(backend, group.size(), opts.pairs)
    if pairs_skipped:
        log(f"send/recv pairs skipped: {pairs_skipped}")
    latency = summary(collectives.all_sum_latency(group, opts.latency_iters))
    log(f"latency 1-element all_sum: median {latency['median_s'] * 1e6:.1f} us, p99 {latency['p99_s'] * 1e6:.1f} us")
    result = {
        "kind": "link",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "world_size": group.size(),
        "backend": backend,
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "latency": latency,
        "all_sum": _all_sum_sweep(group, opts, log),
        "all_gather": _all_gather_sweep(group, opts) if opts.gather_sizes else [],
        "pairs": _pair_sweep(group, opts) if opts.pairs and group.size() > 1 and not pairs_skipped else [],
        "pairs_skipped": pairs_skipped,
    }
    result["seconds"] = round(time.time() - started, 1)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mjc-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_size, nargs="+", default=DEFAULT_SIZES, help="all_sum sizes (4K .. 256M)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of checked and bare loops per size")
    p.add_argument(
        "--budget", type=parse_size, default=256 * MB, help="bytes moved per size and round (sets iterations)"
    )
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--latency-iters", type=int, default=500, help="1-element all_sum samples")
    p.add_argument("--gather-sizes", type=parse_size, nargs="*", default=[], help="all_gather sizes per rank")
    p.add_argument("--pairs", action="store_true", help="send/recv between every pair of ranks")
    p.add_argument("--pair-size", type=parse_size, default=16 * MB)
    p.add_argument("--out", type=Path, help="where rank 0 writes the JSON (default: stdout)")
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=10.0,
        help="seconds without a heartbeat before a rank counts as lost (the watchdog on MJC_CONTROL)",
    )
    p.add_argument("--join-timeout", type=float, default=120.0, help="seconds for every rank to join the watchdog")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    rank, world = int(os.environ.get("MLX_RANK", "0")), int(os.environ.get("MLX_WORLD_SIZE", "1"))
    control = os.environ.get("MJC_CONTROL")
    watchdog = None
    if control and world > 1:
        from .settings import Settings

        settings = Settings()  # the service's own environment: its secret and peer addresses
        watchdog = Watchdog(
            rank,
            world,
            control,
            opts.peer_timeout,
            opts.join_timeout,
            secret=settings.secret(),
            allowed_ips=settings.peer_ips,
        )
    if watchdog:
        watchdog.start()  # before the MLX group: a rank that never comes is named too
    group = init_group()
    rank = group.rank()

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[mjc-bench] {msg}", file=sys.stderr, flush=True)

    try:
        result = link_sweep(group, opts, log)
    except Exception:
        if not watchdog:
            raise
        # MLX may notice a closed peer first: give the watchdog a moment to name it. Then
        # leave at once: a normal interpreter exit freezes the watchdog's threads and can
        # wait on MLX's half-closed group.
        watchdog.wait_for_loss(min(3.0, opts.peer_timeout))
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if watchdog:
        # Stop watching, then meet once more: when rank 0 leaves (closing every connection),
        # every rank has already stopped watching, so no one takes that for a loss.
        import mlx.core as mx

        watchdog.stop()
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))
    if rank == 0:
        text = json.dumps(result, indent=1)
        if opts.out:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(text + "\n")
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
