#!/usr/bin/env python3
"""Whether MLX's CUDA attention-graph cache raises "Cache thrashing" after enough distinct
prompt shapes (a measuring script, not a test): attention over N distinct lengths in turn.

    python benchmarks/sdpa_thrash.py [--shapes 700]
"""

import argparse
import os
import sys
import time

import mlx.core as mx

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--shapes", type=int, default=700, help="distinct lengths, 16 upwards (at least 1)")
N = p.parse_args().shapes
if N < 1:
    p.error(f"--shapes {N}: give at least 1")
print(
    f"mlx {mx.__version__} on {mx.default_device()}; MLX_CUDA_SDPA_CACHE_SIZE="
    f"{os.environ.get('MLX_CUDA_SDPA_CACHE_SIZE', 'default')}, check "
    f"{os.environ.get('MLX_ENABLE_CACHE_THRASHING_CHECK', 'default')}",
    flush=True,
)
start = time.perf_counter()
for i in range(N):
    length = 16 + i
    q = mx.random.normal((1, 16, length, 128)).astype(mx.bfloat16)
    try:
        mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1, mask="causal"))
    except RuntimeError as exc:
        print(f"raised at shape {i + 1} (length {length}) after {time.perf_counter() - start:.1f} s: {exc}")
        sys.exit(1)
    if (i + 1) % 100 == 0:
        print(f"{i + 1} shapes, {time.perf_counter() - start:.1f} s", flush=True)
print(f"no raise after {N} distinct shapes")
