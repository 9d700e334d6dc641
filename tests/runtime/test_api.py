"""The API of a 2-rank tensor-parallel cluster, as clients see it."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import running_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    with running_cluster(tiny_llama, 2, tmp_path_factory.mktemp("api"), args=("--max-queue", "8")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url("/v1"), api_key="unused", max_retries=0)


def test_health_reports_the_group(cluster):
    r = httpx.get(cluster.url("/health"))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["world_size"] == 2 and body["ranks_up"] == 2
    assert body["backend"] == "ring" and body["model"] == cluster.model_id
    assert body["queue_depth"] == 0


def test_openai_client_lists_the_model(client, cluster):
    assert [m.id for m in client.models.list().data] == [cluster.model_id]


def test_openai_client_chat(client, cluster):
    out = client.chat.completions.create(
        model=cluster.model_id, temperature=0, max_tokens=12, messages=[{"role": "user", "content": "hello"}]
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_openai_client_streams_with_usage(client, cluster):
    stream = client.chat.completions.create(
        model=cluster.model_id,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hello"}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model=cluster.model_id, temperature=0, max_tokens=12, messages=[{"role": "user", "content": "hello"}]
    )
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_openai_client_completions(client, cluster):
    out = client.completions.create(model=cluster.model_id, prompt="The quick brown", max_tokens=8, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=cluster.model_id, prompt="The quick brown", max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == out.choices[0].text


def test_logprobs_chat_shape(client, cluster):
    out = client.chat.completions.create(
        model=cluster.model_id,
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        messages=[{"role": "user", "content": "hi"}],
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


def test_logprobs_completions_shape(cluster):
    r = httpx.post(
        cluster.url("/v1/completions"),
        json={"model": cluster.model_id, "prompt": "The quick", "max_tokens": 4, "temperature": 0, "logprobs": 2},
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert all(v <= 0 for v in lp["token_logprobs"])


def test_stop_string_ends_output_before_it(cluster):
    base = cluster.chat("Tell me about the fox", max_tokens=30)["choices"][0]["message"]["content"]
    assert len(base) > 6
    stop = base[4:7]
    out = cluster.chat("Tell me about the fox", max_tokens=30, stop=[stop])
    assert out["choices"][0]["message"]["content"] == base[: base.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats_and_seeds_differ(cluster):
    def sample(seed):
        return cluster.chat("fox", max_tokens=16, temperature=1.0, seed=seed)["choices"][0]["message"]["content"]

    assert sample(11) == sample(11)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


async def _stream_one(client: httpx.AsyncClient, cluster, content: str) -> str:
    body = {
        "model": cluster.model_id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
    }
    parts = []
    async with client.stream("POST", cluster.url("/v1/chat/completions"), json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts.append(chunk["choices"][0]["delta"].get("content", ""))
    return "".join(parts)


def test_eight_concurrent_streams_match_their_solo_answers(cluster):
    prompts = [f"story number {i} about a fox" for i in range(8)]
    solo = {p: cluster.chat(p, max_tokens=24)["choices"][0]["message"]["content"] for p in prompts}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(_stream_one(client, cluster, p) for p in prompts))

    results = asyncio.run(run())
    assert dict(zip(prompts, results)) == solo
    health = httpx.get(cluster.url("/health")).json()
    assert health["status"] == "ok" and health["ranks_up"] == 2


def test_disconnect_frees_the_slot_and_next_answer_is_right(cluster):
    expected = cluster.chat("after the disconnect", max_tokens=16)["choices"][0]["message"]["content"]
    body = {
        "model": cluster.model_id,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 1000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", cluster.url("/v1/chat/completions"), json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 5
    while httpx.get(cluster.url("/health")).json()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(cluster.url("/health")).json()["active"] == 0
    assert cluster.chat("after the disconnect", max_tokens=16)["choices"][0]["message"]["content"] == expected


BAD_INPUTS = [
    ("not json", "{", 400, None),
    ("body is a list", [], 400, None),
    ("no messages", {"model": "M"}, 400, "messages"),
    ("empty messages", {"model": "M", "messages": []}, 400, "messages"),
    ("bad role", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("content wrong type", {"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    (
        "image part",
        {"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages.0.content",
    ),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    (
        "max_tokens zero",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens string",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"},
        400,
        "max_tokens",
    ),
    (
        "max_tokens beyond context",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**7},
        400,
        "max_tokens",
    ),
    (
        "temperature negative",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "temperature",
    ),
    ("top_p zero", {"model": "M", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    (
        "top_logprobs too many",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 11},
        400,
        "top_logprobs",
    ),
    ("stop empty", {"model": "M", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop"),
    (
        "logit_bias key",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}},
        400,
        "logit_bias",
    ),
    (
        "logit_bias out of vocab",
        {"model": "M", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}},
        400,
        "logit_bias",
    ),
    ("n > 1", {"model": "M", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("stream not bool", {"model": "M", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    (
        "tools for a model with no tool format",
        {
            "model": "M",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tools",
    ),
    ("prompt too long", {"model": "M", "messages": [{"role": "user", "content": "fox " * 5000}]}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(cluster, name, body, status, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body = body | {"model": cluster.model_id}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(cluster.url("/v1/chat/completions"), content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param:
        assert error["param"] == param
        assert param.split(".")[0] in error["message"]
    assert httpx.get(cluster.url("/health")).status_code == 200


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [10**8]}, "prompt"),
        ({"prompt": "x", "logprobs": 11}, "logprobs"),
    ],
)
def test_bad_completion_input(cluster, body, param):
    r = httpx.post(cluster.url("/v1/completions"), json={"model": cluster.model_id} | body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_route_is_openai_shaped_404(cluster):
    r = httpx.get(cluster.url("/v1/nothing"))
    assert r.status_code == 404
    assert "error" in r.json()
