"""Prefix caching across ranks: a chat's next turn reuses the KV cache of the turn before,
every rank reuses the same number of tokens, and the text is what a fresh in-process
mlx-lm gives for the whole prompt."""

from __future__ import annotations

import pytest
from conftest import reference_text

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers about the weather and capitals."}


def _turns(cluster, max_tokens=16):
    first = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    one = cluster.chat("", messages=first, max_tokens=max_tokens)
    second = first + [
        {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And the weather in Paris?"},
    ]
    two = cluster.chat("", messages=second, max_tokens=max_tokens)
    return first, one, second, two


@pytest.mark.parametrize("model_fixture, parallel", [("tiny_llama", "tensor"), ("tiny_qwen2", "pipeline")])
def test_the_next_turn_reuses_the_first(request, cluster_factory, model_fixture, parallel):
    model = request.getfixturevalue(model_fixture)
    cluster = cluster_factory(model, 2, args=("--parallel", parallel))
    cluster.wait_ready()
    first, one, second, two = _turns(cluster)
    assert one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert one["usage"]["prompt_tokens"] <= cached < two["usage"]["prompt_tokens"]
    assert two["choices"][0]["message"]["content"] == reference_text(model, second, max_tokens=16)

    again = cluster.chat("", messages=second, max_tokens=16)  # the same prompt: all but its last token
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == two["usage"]["prompt_tokens"] - 1
    assert again["choices"][0]["message"]["content"] == two["choices"][0]["message"]["content"]
    assert cluster.health()[1]["ranks_up"] == 2


def test_size_zero_turns_it_off(cluster_factory, tiny_llama):
    cluster = cluster_factory(tiny_llama, 2, args=("--prompt-cache-size", "0"))
    cluster.wait_ready()
    _, _, second, two = _turns(cluster)
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert two["choices"][0]["message"]["content"] == reference_text(tiny_llama, second, max_tokens=16)
