#!/usr/bin/env python3
"""Host memory per draw of one row's token, by how it is drawn (a measuring script, not a test).

    python benchmarks/sampler_rss.py [--steps 5000] [--vocab 32000]

For one row of logits MLX's ``mx.random.categorical`` samples by inverse CDF (cumsum, then
searchsorted); for several rows, and in the ``gumbel`` row here, by adding Gumbel noise and
taking the argmax; ``argmax`` is greedy. Prints malloc's memory in use (glibc) after a
warm-up and after STEPS draws of each, in this plain process (glibc's default malloc
settings, not a rank's ``allocator.tune_malloc``).
"""

import argparse
import sys
import time

import mlx.core as mx

from mlx_jaccl_cluster.engine import allocator

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


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=_positive, default=5000, help="draws of each kind, after 300 warm-up draws")
    p.add_argument("--vocab", type=_positive, default=32000, help="the row's length")
    a = p.parse_args()
    logits = mx.random.normal((1, a.vocab))
    mx.eval(logits)
    print(f"mlx {mx.__version__} on {mx.default_device()}, vocab {a.vocab}, {a.steps} draws each")
    for mode in ("argmax", "gumbel", "inverse_cdf"):
        for i in range(300):
            draw(mode, logits, i)
        before = in_use_mb()
        start = time.perf_counter()
        for i in range(a.steps):
            draw(mode, logits, i)
        took = time.perf_counter() - start
        after = in_use_mb()
        print(
            f"{mode:12s} malloc in use {before:8.1f} -> {after:8.1f} MB, "
            f"{(after - before) * 2**20 / a.steps / 1024:7.2f} KB a draw, {took / a.steps * 1e3:.3f} ms a draw"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
