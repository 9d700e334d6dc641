"""glibc's malloc, tuned so that a rank's RSS follows what it uses (Linux only).

Two settings, both made once at the start of the process (``tune_malloc``):

- **The mmap threshold, fixed at 128 KiB.** On the CPU backend MLX's buffers come from
  ``malloc``. glibc serves a large request with its own ``mmap`` (returned to the system on
  ``free``) only above a threshold that starts at 128 KiB but *rises to the size of every
  such block freed*, up to 32 MiB; after the first few freed activations or KV buffers,
  everything is carved from the heap or a thread's 64 MiB arena instead, and a freed buffer
  there goes back to the system only if nothing younger sits above it. With the engine, the
  tokenizing threads and the heartbeats all allocating, that is rarely the case: in a soak
  rank 0's RSS kept climbing while MLX's active memory and buffer cache (bounded by
  ``mlx_cache_limit``) stayed flat. Fixing the threshold stops it rising, so MLX's buffers
  are always mapped on their own and returned when MLX lets them go. MLX's buffer cache
  still reuses freed buffers, so few allocations pay for a fresh mapping.
- **At most ``malloc_arena_max`` arenas** (``Settings``; glibc's own limit is 8 per core).
  A thread's first allocation makes it a new arena unless one of an ended thread is free,
  and an arena keeps its high-water mark. On a many-core GPU host a rank's arenas kept
  multiplying through a soak (docs/BENCHMARKS.md, "Soak on GPUs: what grew is glibc's
  per-thread arenas"; what they held was memory in use, which with the cap sits in the main
  heap instead). The cap bounds how many arenas there are; one arena can still grow, by
  chaining heaps. glibc fixes its limit once the process has more arenas than
  ``M_ARENA_TEST`` (8), so the cap is set first thing in the rank's ``main``, before any
  thread starts.

``heap_stats`` reads what glibc's heaps hold, in use and free, for the heartbeat
(docs/runtime.md, "Memory", says how to read them).

macOS (Metal buffers, its own malloc) needs none of this; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time

log = logging.getLogger("mjc.engine")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, now fixed


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33 and later): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc_function(name: str):
    """glibc's function ``name``, or None (not Linux, or a libc without it: musl, glibc < 2.33
    for ``mallinfo2``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    if name == "mallinfo2":
        function.restype = _MallInfo2
    return function


def _set(param: int, value: int, what: str) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    if mallopt(param, value) != 1:
        log.warning("mallopt(%s, %d) failed: this rank's RSS may keep memory it freed", what, value)
        return False
    return True


def map_large_buffers() -> bool:
    """Fix glibc's mmap threshold for this process; True when it was set."""
    return _set(M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD")


def cap_arenas(arena_max: int) -> bool:
    """At most ``arena_max`` malloc arenas in this process; True when set (0: glibc's own)."""
    return arena_max > 0 and _set(M_ARENA_MAX, arena_max, "M_ARENA_MAX")


def tune_malloc(arena_max: int) -> None:
    """Both, for this process: call before it starts threads."""
    map_large_buffers()
    cap_arenas(arena_max)


HEAP_STATS_MAX_AGE = 1.0  # s: mallinfo2 walks every free chunk under the arenas' locks
_heap_stats: tuple[float, dict[str, int]] = (float("-inf"), {})


def heap_stats() -> dict[str, int]:
    """Bytes glibc's heaps and arenas hold for this process: ``malloc_in_use`` (handed out
    and not freed) and ``malloc_free`` (freed, kept for reuse; part of it may have been given
    back to the system page by page). Blocks mapped on their own (above the mmap threshold:
    MLX's CPU buffers) are in neither. Empty where glibc cannot say (before 2.33, musl, macOS).

    Read at most once every ``HEAP_STATS_MAX_AGE`` s, whoever asks (heartbeats, the dashboard,
    /metrics): ``mallinfo2`` holds each arena's lock while it counts the free chunks, so its
    cost grows with their number, and the engine thread shares those arenas."""
    global _heap_stats
    read_at, stats = _heap_stats
    now = time.monotonic()
    if now - read_at < HEAP_STATS_MAX_AGE:
        return stats
    stats = {}
    if (mallinfo2 := _libc_function("mallinfo2")) is not None:
        info = mallinfo2()
        stats = {"malloc_in_use": info.uordblks, "malloc_free": info.fordblks}
    _heap_stats = (now, stats)
    return stats
