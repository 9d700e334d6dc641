"""What the cluster is doing right now, as rank 0 reports it on /health. No MLX."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

PHASES = ("starting", "waiting_for_ranks", "loading", "ready", "lost", "failed")


@dataclass
class ClusterState:
    world_size: int
    backend: str
    model_id: str
    phase: str = "starting"
    detail: str = ""
    started: float = field(default_factory=time.time)
    ranks_up: Callable[[], int] = lambda: 1
    rank_stats: Callable[[], dict[int, dict]] = dict
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
