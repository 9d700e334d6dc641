"""kv_bits / kv_group_size: mlx-lm 0.32.2's BatchGenerator cannot run a quantized KV cache,
so the settings are refused, by preflight (the inventory) and by the rank, saying why.
The first test checks that fact on the installed mlx-lm: when a release can batch a
QuantizedKVCache it fails, and the settings can be offered."""

from __future__ import annotations

import inspect

import pytest

from mlx_jaccl_cluster.ops.checks import validate_cluster
from mlx_jaccl_cluster.ops.schema import GROUP
from mlx_jaccl_cluster.settings import KV_QUANTIZATION_REFUSED, Settings


def test_mlx_lm_batch_generator_cannot_batch_a_quantized_kv_cache():
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, _merge_caches
    from mlx_lm.models.cache import QuantizedKVCache

    assert "kv_bits" not in inspect.signature(BatchGenerator.__init__).parameters
    caches = []
    for _ in range(2):  # two finished prompts' caches, as BatchGenerator joins them into one batch
        c = QuantizedKVCache(group_size=32, bits=4)
        c.update_and_fetch(mx.zeros((1, 2, 3, 32)), mx.zeros((1, 2, 3, 32)))
        caches.append([c])
    with pytest.raises(ValueError, match="does not yet support batching"):
        _merge_caches(caches)


def inventory(**runtime):
    hosts = {
        f"mac{r}": {"cluster_rank": r, "ansible_host": f"mac{r}.local", "cluster_ips": [f"10.0.0.{r + 1}"]}
        for r in range(2)
    }
    group = {
        "cluster_backend": "ring",
        "cluster_model_name": "m",
        "cluster_model_path": "/opt/m",
        "cluster_model_source": "smollm2",
        "cluster_runtime_settings": runtime,
    }
    return hosts, group


@pytest.mark.parametrize("key, value", [("kv_bits", 4), ("kv_group_size", 64)])
def test_preflight_refuses_kv_quantization_saying_why(key, value):
    problems = [p for p in validate_cluster(*inventory(**{key: value})) if key in p.field]
    assert [(p.host, p.field) for p in problems] == [(GROUP, f"cluster_runtime_settings.{key}")]
    text = str(problems[0])
    assert "batchgenerator cannot batch" in text and "remove it" in text and "max_context" in text
    assert not [p for p in validate_cluster(*inventory(max_batch=2)) if "runtime_settings" in p.field]


def test_the_rank_refuses_it_too(tmp_path, monkeypatch):
    monkeypatch.setenv("MJC_KV_BITS", "8")
    with pytest.raises(ValueError, match="QuantizedKVCache has no merge"):
        Settings(model=tmp_path, world_size=1)
    monkeypatch.delenv("MJC_KV_BITS")
    assert Settings(model=tmp_path, world_size=1).kv_bits is None
    assert "BatchGenerator" in KV_QUANTIZATION_REFUSED
