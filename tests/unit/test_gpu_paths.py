"""The engine's GPU-found changes: the batch-of-one mask, and the nccl start-up fixes."""

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from mlx_jaccl_cluster import main
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
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(main.os, "listdir", lambda path: ["0000:60:00.0", "0000:70:00.0"])
    main._pin_cuda_device(3)
    assert main.os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the operator's choice wins
    main._pin_cuda_device(0)
    assert main.os.environ["CUDA_VISIBLE_DEVICES"] == "7"


def test_a_rank_turns_off_mlx_cuda_cache_thrashing_exception(monkeypatch):
    """On CUDA, MLX raised "Cache thrashing is happening" at the 513th distinct attention
    shape of a process and the rank's engine died (docs/BENCHMARKS.md, session 11); a rank
    turns that check off unless its environment says otherwise."""
    monkeypatch.delenv("MLX_ENABLE_CACHE_THRASHING_CHECK", raising=False)
    main._set_env_defaults()
    assert main.os.environ["MLX_ENABLE_CACHE_THRASHING_CHECK"] == "0"
    monkeypatch.setenv("MLX_ENABLE_CACHE_THRASHING_CHECK", "1")  # the operator's choice wins
    main._set_env_defaults()
    assert main.os.environ["MLX_ENABLE_CACHE_THRASHING_CHECK"] == "1"
