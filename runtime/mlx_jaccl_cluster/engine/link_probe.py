"""The idle-time link probe: rank 0 decides when, every rank runs the same steps.

While no request is running, rank 0's engine asks ``LinkProbe.next_step()`` for work. A
due probe (1-element ``all_sum`` latency every ``probe_latency_interval`` s, ``all_sum``
bandwidth every ``probe_bandwidth_interval`` s) is cut into ``probe_steps`` small steps
of ``probe_step_iters`` collectives each. Rank 0 names each step in a STEP frame (field
``p``), so every rank runs ``run_step`` at the same point of its step sequence; a request
that arrives mid-probe is taken before the next step, so it waits at most one step, and
the probe's remaining steps run when the cluster is idle again.

The collectives and their timing are ``collectives.py``'s; they run on mlx-lm's
generation stream, the stream of the model's own collectives, so they queue behind
anything a finished generation step left there instead of interleaving with it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.generate import generation_stream

from ..settings import Settings
from ..state import LinkStats
from .collectives import all_sum_latency, all_sum_times

LATENCY, BANDWIDTH = "lat", "bw"


def run_step(group: mx.distributed.Group, spec: dict) -> list[float]:
    """Run one probe step named by rank 0 (same call on every rank); seconds per collective.

    ``spec``: ``{"k": "lat"|"bw", "n": bytes, "it": timed iterations}``. Each step starts
    with one untimed warm-up collective, so steps stay independent when a request comes
    between them.
    """
    kind, iters = spec.get("k"), spec.get("it")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"probe step {spec!r}: 'it' must be a positive integer")
    with mx.stream(generation_stream):
        if kind == LATENCY:
            return all_sum_latency(group, iters, warmup=1)
        if kind == BANDWIDTH:
            return all_sum_times(group, int(spec["n"]), iters, warmup=1)
    raise ValueError(f"probe step {spec!r}: unknown kind {kind!r}")


class LinkProbe:
    """Rank 0's schedule of probe steps and the figures they give (into ``LinkStats``)."""

    def __init__(self, settings: Settings, link: LinkStats, clock: Callable[[], float] = time.monotonic):
        self.link = link
        self.clock = clock
        self.steps = settings.probe_steps
        self.iters = settings.probe_step_iters
        self.nbytes = settings.probe_bandwidth_bytes
        self.intervals = {LATENCY: settings.probe_latency_interval, BANDWIDTH: settings.probe_bandwidth_interval}
        self.intervals = {k: v for k, v in self.intervals.items() if v > 0}
        now = clock()
        self._due = dict.fromkeys(self.intervals, now)  # first figures as soon as the cluster is idle
        self._kind: str | None = None  # the probe in progress
        self._samples: list[float] = []
        self._done_steps = 0

    @property
    def enabled(self) -> bool:
        return bool(self.intervals)

    def wait(self) -> float | None:
        """Seconds until a probe step is due (0: now); None when the probe is off."""
        if self._kind is not None:
            return 0.0
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - self.clock())

    def next_step(self) -> dict | None:
        """The step to run now, or None when no probe is due."""
        if self._kind is None:
            now = self.clock()
            due = [k for k, t in sorted(self._due.items(), key=lambda kv: kv[1]) if t <= now]
            if not due:
                return None
            self._kind, self._samples, self._done_steps = due[0], [], 0
        spec = {"k": self._kind, "it": self.iters}
        if self._kind == BANDWIDTH:
            spec["n"] = self.nbytes
        return spec

    def run(self, group: mx.distributed.Group, spec: dict) -> None:
        """Run ``spec`` on rank 0 (followers call ``run_step`` directly) and record it."""
        started = time.perf_counter()
        samples = run_step(group, spec)
        self.record(spec, samples, time.perf_counter() - started)

    def record(self, spec: dict, samples: list[float], elapsed: float) -> None:
        """Account one finished step; publish the figure when the probe's last step is done."""
        link = self.link
        link.steps += 1
        link.last_step_s = elapsed
        link.max_step_s = max(link.max_step_s, elapsed)
        self._samples.extend(samples)
        self._done_steps += 1
        if self._done_steps < self.steps:
            return
        kind, median = self._kind, statistics.median(self._samples)
        self._kind = None
        self._due[kind] = self.clock() + self.intervals[kind]
        link.probes += 1
        if kind == LATENCY:
            link.latency_s, link.latency_at = median, time.time()
        else:
            link.bandwidth_bps, link.bandwidth_bytes, link.bandwidth_at = spec["n"] / median, spec["n"], time.time()
