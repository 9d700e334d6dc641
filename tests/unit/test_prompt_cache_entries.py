"""engine/prompt_cache.py on a real tiny model's KV cache: what a prompt may reuse."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_jaccl_cluster.engine.prompt_cache import PromptCache
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
