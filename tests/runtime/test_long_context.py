"""Long context: a prompt of more than 8,000 tokens gives the same greedy text over 2-rank
tensor and 2-rank pipeline (generic split) as in-process mlx-lm on one rank. Users of other
Mac clusters report garbage past 4k tokens in tensor parallel; this is the check that we
do not. The prefill runs in 2048-token chunks on both sides (mlx-lm's stream_generate
default), so both compute the same chunks."""

from __future__ import annotations

import httpx
import pytest
from conftest import reference_text

from mlx_jaccl_cluster.models.tiny import CORPUS, build_tiny_model

pytestmark = pytest.mark.slow

MIN_TOKENS = 8000


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    # small enough that 8k tokens of attention stay cheap on 2 busy cores; 2 layers still split
    return build_tiny_model(
        tmp_path_factory.mktemp("long") / "llama-16k",
        arch="llama",
        max_position_embeddings=16384,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
    )


@pytest.fixture(scope="module")
def long_prompt(long_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(long_model))
    paragraphs = CORPUS.split("\n\n")
    text, i = "", 0
    while len(tok.encode(text)) < MIN_TOKENS:
        text += f"Part {i}. " + paragraphs[i % len(paragraphs)] + "\n\n"
        i += 1
    return text + "To sum up,"


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_long_prompt_equals_one_rank(parallel, long_model, long_prompt, cluster_factory):
    cluster = cluster_factory(
        long_model,
        2,
        parallel=parallel,
        args=("--prefill-step-size", "2048", "--request-timeout", "1500", "--heartbeat-misses", "30"),
    )
    assert cluster.wait_ready()["parallel"] == parallel
    r = httpx.post(
        cluster.url("/v1/completions"),
        timeout=1600,
        json={"model": cluster.model_id, "prompt": long_prompt, "max_tokens": 24, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] >= MIN_TOKENS
    expected = reference_text(long_model, prompt=long_prompt, max_tokens=24)
    assert len(set(expected)) > 3
    assert body["choices"][0]["text"] == expected
