"""What the cluster is doing right now, as rank 0 reports it on /health and the dashboard. No MLX."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PHASES = ("starting", "waiting_for_ranks", "loading", "ready", "lost", "failed")


@dataclass
class LinkStats:
    """The idle-time link probe's latest figures: written by rank 0's engine, read by the API."""

    latency_s: float | None = None  # median 1-element all_sum
    latency_at: float | None = None  # wall-clock time of that figure
    bandwidth_bps: float | None = None  # bytes per second: message size / median all_sum time
    bandwidth_bytes: int | None = None  # message size of that figure
    bandwidth_at: float | None = None
    probes: int = 0  # probes completed
    steps: int = 0  # probe steps run
    last_step_s: float | None = None  # the longest a request can have waited for the last step
    max_step_s: float = 0.0


@dataclass
class ClusterState:
    world_size: int
    backend: str
    model_id: str
    phase: str = "starting"
    detail: str = ""
    started: float = field(default_factory=time.time)
    ranks_up: Callable[[], int] = lambda: 1
    # per rank: host, address, up, silent_s, memory (active, peak, cache, rss bytes)
    ranks: Callable[[], dict[int, dict]] = dict
    links: list[list[str]] = field(default_factory=list)  # per rank: ring addresses or RDMA devices
    link: LinkStats = field(default_factory=LinkStats)
    # how the model is split (tensor / pipeline / none) and why, set once rank 0 has loaded it
    parallel: str = ""
    parallel_reason: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, phase: str, detail: str = "") -> None:
        assert phase in PHASES, phase
        with self._lock:
            if self.phase in ("lost", "failed"):
                return  # terminal: the process is about to exit
            self.phase, self.detail = phase, detail

    @property
    def ready(self) -> bool:
        return self.phase == "ready"
