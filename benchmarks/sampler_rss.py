#!/usr/bin/env python3
"""Host memory per draw of one row's token, by how it is drawn (a measuring script, not a test).

    python benchmarks/sampler_rss.py [STEPS] [VOCAB]

For one row of logits MLX's ``mx.random.categorical`` samples by inverse CDF (cumsum, then
searchsorted); for several rows, and in the ``gumbel`` row here, by adding Gumbel noise and
taking the argmax; ``argmax`` is greedy. Prints malloc's memory in use (glibc) after a
warm-up and after STEPS draws of each, in this plain process (glibc's default malloc
settings, not a rank's ``allocator.tune_malloc``).
"""

import sys
import time

import mlx.core as mx

from mlx_jaccl_cluster.engine import allocator

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
VOCAB = int(sys.argv[2]) if len(sys.argv) > 2 else 32000


allocator.HEAP_STATS_MAX_AGE = 0.0  # a fresh reading each time, not the once-a-second one


def in_use_mb() -> float:
    return allocator.heap_stats().get("malloc_in_use", 0) / 2**20


def draw(mode: str, logits: mx.array, i: int) -> int:
    key = mx.random.key(i)
    if mode == "argmax":
        tok = mx.argmax(logits, axis=-1)
    elif mode == "gumbel":
        tok = mx.argmax(logits + mx.random.gumbel(logits.shape, key=key), axis=-1)
    else:
        tok = mx.random.categorical(logits, key=key)
    return tok.item()


def main() -> int:
    logits = mx.random.normal((1, VOCAB))
    mx.eval(logits)
    print(f"mlx {mx.__version__} on {mx.default_device()}, vocab {VOCAB}, {STEPS} draws each")
    for mode in ("argmax", "gumbel", "inverse_cdf"):
        for i in range(300):
            draw(mode, logits, i)
        before = in_use_mb()
        start = time.perf_counter()
        for i in range(STEPS):
            draw(mode, logits, i)
        took = time.perf_counter() - start
        after = in_use_mb()
        print(
            f"{mode:12s} malloc in use {before:8.1f} -> {after:8.1f} MB, "
            f"{(after - before) * 2**20 / STEPS / 1024:7.2f} KB a draw, {took / STEPS * 1e3:.3f} ms a draw"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
