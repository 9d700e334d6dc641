"""The engine's GPU-found changes: the batch-of-one mask, the nccl start-up fixes, and MLX's
CUDA cache check turned off."""

from unittest import mock

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache

from mlx_jaccl_cluster import main, settings
from mlx_jaccl_cluster.engine import fastpath
from mlx_jaccl_cluster.engine.loader import _collectives_on_gpu


def _cache(batch: int, length: int = 5) -> BatchKVCache:
    cache = BatchKVCache([0] * batch)
    kv = mx.zeros((batch, 2, length, 4))
    cache.update_and_fetch(kv, kv)
    return cache


def test_a_batch_of_one_decoding_takes_no_mask():
    fastpath.install()
    assert _cache(1).make_mask(1, window_size=None) is None


def test_other_steps_keep_their_mask():
    fastpath.install()
    assert isinstance(_cache(2).make_mask(1, window_size=None), mx.array)  # two sequences: padding matters
    assert isinstance(_cache(1).make_mask(3, window_size=None), mx.array)  # a prompt chunk: causal
    assert isinstance(_cache(1).make_mask(1, window_size=2), mx.array)  # sliding window


def test_nccl_load_runs_the_cpu_stream_barrier_on_the_default_stream():
    original = mx.distributed.all_sum
    with _collectives_on_gpu("nccl"):
        assert mx.distributed.all_sum is not original
        assert mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu).item() == 1.0
    assert mx.distributed.all_sum is original
    with _collectives_on_gpu("ring"):
        assert mx.distributed.all_sum is original


def test_nccl_rank_sees_only_its_gpu(monkeypatch):
    monkeypatch.setattr(main.os, "listdir", lambda path: ["0000:60:00.0", "0000:70:00.0"])
    with mock.patch.dict(main.os.environ):  # restored whole afterwards
        main.os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        main._pin_cuda_device(3)
        assert main.os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        main.os.environ["CUDA_VISIBLE_DEVICES"] = "7"  # the operator's choice wins
        main._pin_cuda_device(0)
        assert main.os.environ["CUDA_VISIBLE_DEVICES"] == "7"


def test_a_rank_turns_off_mlx_cuda_cache_thrashing_exception_before_anything_else(monkeypatch):
    """MLX on CUDA raises "Cache thrashing is happening" from inside an eval once one of its
    per-shape caches has missed more than twice its size, and the engine thread dies with it
    (docs/BENCHMARKS.md, "Soak on GPUs, session 11"). A rank turns that check off before it
    reads its settings (MLX reads the variable when it builds a cache), unless its
    environment already says otherwise."""
    seen: dict[str, str] = {}

    def load_settings(argv):
        seen.update(main.os.environ)
        raise ValueError("stop here")

    monkeypatch.setattr(settings, "load_settings", load_settings)
    with mock.patch.dict(main.os.environ):  # restored whole afterwards
        main.os.environ.pop("MLX_ENABLE_CACHE_THRASHING_CHECK", None)
        with pytest.raises(SystemExit) as stopped:
            main.main([])
        assert stopped.value.code == main.EXIT_CONFIG
        assert seen["MLX_ENABLE_CACHE_THRASHING_CHECK"] == "0"
        main.os.environ["MLX_ENABLE_CACHE_THRASHING_CHECK"] = "1"  # the operator's choice wins
        main.set_env_defaults()
        assert main.os.environ["MLX_ENABLE_CACHE_THRASHING_CHECK"] == "1"
