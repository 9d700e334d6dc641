"""The cluster's answer equals in-process mlx-lm's, for every supported split."""

import json

import httpx
import pytest
from conftest import reference_text

from mlx_jaccl_cluster.engine.sampling import make_sampler
from mlx_jaccl_cluster.generation import SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
PROMPT = "The capital of France is"
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7)


def _stream_text(cluster, body) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", cluster.url("/v1/chat/completions"), json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks


@pytest.mark.parametrize(
    "arch,world,parallel",
    [("llama", 1, "tensor"), ("llama", 2, "tensor"), ("qwen2", 2, "pipeline"), ("qwen2", 3, "pipeline")],
    ids=["1rank", "2rank-tensor", "2rank-pipeline", "3rank-pipeline"],
)
def test_cluster_output_matches_in_process_mlx_lm(arch, world, parallel, request, cluster_factory):
    model = request.getfixturevalue(f"tiny_{arch}")
    cluster = cluster_factory(model, world, parallel=parallel)
    health = cluster.wait_ready()
    assert health["world_size"] == world and health["ranks_up"] == world

    expected = reference_text(model, messages=MESSAGES, max_tokens=24)
    assert len(set(expected)) > 3, "the test model should produce varied text"

    body = {"model": cluster.model_id, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    full = cluster.chat(MESSAGES[0]["content"], max_tokens=24)
    assert full["choices"][0]["message"]["content"] == expected
    assert full["usage"]["completion_tokens"] <= 24
    assert full["usage"]["prompt_tokens"] > 5

    streamed, chunks = _stream_text(cluster, body | {"stream": True})
    assert streamed == expected
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    r = httpx.post(
        cluster.url("/v1/completions"),
        json={"model": cluster.model_id, "prompt": PROMPT, "max_tokens": 16, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference_text(model, prompt=PROMPT, max_tokens=16)

    # Seeded sampling draws the same numbers as in-process mlx-lm with the same sampler,
    # so the sampled text does not depend on the number of ranks.
    r = httpx.post(
        cluster.url("/v1/completions"),
        timeout=120,
        json={
            "model": cluster.model_id,
            "prompt": PROMPT,
            "max_tokens": 16,
            "temperature": SEEDED.temperature,
            "top_p": SEEDED.top_p,
            "seed": SEEDED.seed,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference_text(
        model, prompt=PROMPT, max_tokens=16, sampler=make_sampler(SEEDED)
    )
