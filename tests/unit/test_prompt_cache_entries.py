"""engine/prompt_cache.py on a real tiny model's KV cache: what a prompt may reuse."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_jaccl_cluster.engine.prompt_cache import PromptCache, held_bytes, kv_bytes_per_token
from mlx_jaccl_cluster.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, _ = load(str(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")))
    return model


def _filled(model, tokens):
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=cache))
    return cache


def test_off_reuses_nothing(model):
    prompts = PromptCache(0)
    prompts.store([1, 2, 3], _filled(model, [1, 2, 3]))
    assert prompts.fetch([1, 2, 3, 4]) == (None, 0) and len(prompts) == 0


def test_an_exact_hit_leaves_the_last_token_to_run(model):
    prompts = PromptCache(4)
    prompts.store([5, 6, 7, 8], _filled(model, [5, 6, 7, 8]))
    cache, reused = prompts.fetch([5, 6, 7, 8])
    assert reused == 3 and cache[0].offset == 3


def test_a_longer_prompt_reuses_the_stored_one_and_a_shorter_a_trimmed_copy(model):
    prompts = PromptCache(4)
    prompts.store([5, 6, 7, 8], _filled(model, [5, 6, 7, 8]))
    assert prompts.fetch([5, 6, 7, 8, 9, 10])[1] == 4
    cache, reused = prompts.fetch([5, 6, 9])
    assert reused == 2 and cache[0].offset == 2
    assert prompts.fetch([5, 6, 7, 8])[0][0].offset == 3  # the stored entry itself was not trimmed


def test_nothing_in_common_reuses_nothing_and_old_entries_are_evicted_by_count(model):
    prompts = PromptCache(2)
    for first in (10, 20, 30):
        prompts.store([first, 1, 2], _filled(model, [first, 1, 2]))
    assert len(prompts) == 2 and prompts.nbytes > 0
    assert prompts.fetch([10, 1, 2, 3]) == (None, 0)  # evicted
    assert prompts.fetch([30, 1, 2, 3])[1] == 3
    assert prompts.fetch([40, 1]) == (None, 0)


def test_entries_are_bounded_by_a_rank_independent_byte_figure(model):
    """tokens x per-token KV bytes of the whole model: pipeline stages and tensor shards
    hold different real bytes, but all count the same and so evict the same entries."""
    per_token = kv_bytes_per_token(
        {
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "num_key_value_heads": 6,
            "hidden_size": 192,
            "torch_dtype": "float32",
        }
    )
    assert per_token == 2 * 6 * 6 * 32 * 4
    prompts = PromptCache(8, max_bytes=10 * per_token, token_bytes=per_token)  # room for 10 tokens
    prompts.store([10, 1, 2, 3], _filled(model, [10, 1, 2, 3]))
    prompts.store([20, 1, 2, 3], _filled(model, [20, 1, 2, 3]))
    assert len(prompts) == 2 and prompts.counted_bytes == 8 * per_token
    prompts.store([30, 1, 2, 3], _filled(model, [30, 1, 2, 3]))  # 12 tokens: the oldest goes
    assert len(prompts) == 2 and prompts.tokens == 8
    assert prompts.fetch([10, 1, 2, 3, 4]) == (None, 0)
    assert prompts.fetch([30, 1, 2, 3, 4])[1] == 4
    prompts.store(list(range(100, 112)), _filled(model, list(range(100, 112))))  # alone over the bound
    assert prompts.counted_bytes <= 10 * per_token


def test_the_per_token_figure_comes_from_the_config_or_is_unknown():
    assert (
        kv_bytes_per_token(
            {
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "hidden_size": 576,
                "torch_dtype": "bfloat16",
            }
        )
        == 2 * 30 * 3 * 64 * 2
    )
    assert (
        kv_bytes_per_token({"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8}})
        == 2 * 2 * 4 * 8 * 2
    )
    assert kv_bytes_per_token({"model_type": "mystery"}) is None


def test_a_stored_entry_holds_its_own_bytes_not_its_batch(model):
    """BatchGenerator hands a finished sequence's cache out as a lazy copy of a slice of
    the whole batch's KV buffers (every sequence, 256-token steps). Kept lazy, each entry
    pins its batch's buffers: rank 0's RSS grew by hundreds of MB under a soak while the
    byte figure said a few MB. Stored entries must own only their own tokens."""
    from mlx_lm.generate import BatchGenerator

    prompts = PromptCache(8)
    mx.eval(model.parameters())
    mx.clear_cache()
    base = mx.get_active_memory()
    for round_ in range(4):
        gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
        gen.insert([[round_ * 8 + i + 1, 2, 3] for i in range(8)], max_tokens=[2 + i for i in range(8)])
        finished = 0
        while finished < 8:
            for r in gen.next()[1]:  # as engine/core.py steps it
                if r.finish_reason is not None:
                    prompts.store(r.all_tokens, r.prompt_cache)
                    finished += 1
        gen.close()
        del gen, r
    mx.clear_cache()
    held = mx.get_active_memory() - base
    assert len(prompts) == 8 and prompts.nbytes < 1 << 20
    assert held <= 2 * prompts.nbytes + (1 << 20), (held, prompts.nbytes)
    assert held_bytes() >= prompts.nbytes  # the heartbeat's prompt_cache figure counts it
