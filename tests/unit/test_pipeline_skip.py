"""The generic pipeline split's skip layers (engine/pipeline.py) on one process: a group of
one makes the final gather the identity, so no second rank is needed."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from mlx_jaccl_cluster.engine.pipeline import Handover, SkipLayer, Unevaluated


class _Layer(nn.Module):
    def __call__(self, x, mask=None, cache=None):
        return x


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_skip_layer_cache_updates_are_evaluated_with_the_output():
    """A batch cache that only skip layers update is evaluated with each step's output, so it
    does not grow a graph step after step (unevaluated: about 4 KB per layer and step, here
    8 layers x 4000 steps, over 100 MB)."""
    group = mx.distributed.init()
    assert group.size() == 1
    pending = Unevaluated()
    layers = [SkipLayer(_Layer(), i, None, pending) for i in range(7)]
    layers.append(SkipLayer(_Layer(), 7, Handover(group, 0, final=True), pending))
    caches = [BatchKVCache([0, 0]) for _ in layers]
    x = mx.ones((2, 1, 64))

    def steps(n: int) -> tuple[float, mx.array]:
        before = _rss_mb()
        for _ in range(n):
            h = x
            for layer, cache in zip(layers, caches):
                h = layer(h, None, cache=cache)
            mx.eval(h)
        return _rss_mb() - before, h

    steps(200)  # allocator warm-up
    grown, h = steps(4000)
    assert grown < 16, f"RSS grew {grown:.0f} MB over 4000 steps"
    assert pending.arrays == []
    assert all(cache.offset.tolist() == [4200, 4200] for cache in caches)
    assert mx.array_equal(h, x).item()  # the hidden state passes through unchanged
