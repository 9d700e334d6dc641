"""Give freed MLX memory back to the system on Linux (glibc), so RSS follows MLX's own figures.

On the CPU backend MLX's buffers come from ``malloc``. glibc serves a large request with its
own ``mmap`` (returned to the system on ``free``) only above a threshold that starts at
128 KiB but *rises to the size of every such block freed*, up to 32 MiB; after the first
few freed activations or KV buffers, everything is carved from the heap or a thread's 64 MiB
arena instead, and a freed buffer there goes back to the system only if nothing younger sits
above it. With the engine, the tokenizing threads and the heartbeats all allocating, that is
rarely the case: in a soak rank 0's RSS kept climbing while MLX's active memory and buffer
cache (bounded by ``mlx_cache_limit``) stayed flat, and the 64 MiB arenas stayed fully
resident. Fixing the threshold stops it rising, so MLX's buffers are always mapped on their
own and returned when MLX lets them go. MLX's buffer cache still reuses freed buffers, so
few allocations pay for a fresh mapping.

macOS (Metal buffers, its own malloc) needs none of this; elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("mjc.engine")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, now fixed


def map_large_buffers() -> bool:
    """Fix glibc's mmap threshold for this process; True when it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: freed MLX memory may stay in this process")
        return False
    return True
