"""Tool calls and reasoning through a 2-rank cluster, with the official OpenAI client.

The scripted model (models/scripted.py) answers every chat with
``<think>…</think>Let me check.<tool_call>{get_weather…}</tool_call>``, so what the
client receives can be checked exactly; the markers are found and the call parsed by
mlx-lm's own machinery for the json_tools format.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import running_cluster

pytestmark = pytest.mark.slow

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
REASONING = "The user asks about the weather, so I call the weather tool."
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def cluster(scripted_qwen2, tmp_path_factory):
    with running_cluster(scripted_qwen2, 2, tmp_path_factory.mktemp("tools")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url("/v1"), api_key="unused", max_retries=0)


def _post(cluster, **body) -> httpx.Response:
    return httpx.post(cluster.url("/v1/chat/completions"), json={"model": cluster.model_id, **body}, timeout=60)


def test_a_tool_call_comes_back_parsed(client, cluster):
    out = client.chat.completions.create(model=cluster.model_id, messages=ASK, tools=TOOLS, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert choice.message.model_extra["reasoning"] == REASONING


def test_a_streamed_tool_call_arrives_whole_with_an_index(client, cluster):
    stream = client.chat.completions.create(
        model=cluster.model_id, messages=ASK, tools=TOOLS, temperature=0, stream=True
    )
    content, reasoning, calls, finish = "", "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning") or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert reasoning == REASONING
    assert finish == "tool_calls"
    (call,) = calls
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"


def test_the_tool_result_goes_back_through_the_template(client, cluster):
    first = client.chat.completions.create(model=cluster.model_id, messages=ASK, tools=TOOLS, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    out = client.chat.completions.create(model=cluster.model_id, messages=follow, tools=TOOLS, temperature=0)
    assert out.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are in the prompt
    assert out.choices[0].finish_reason == "tool_calls"


def test_without_tools_nothing_is_parsed_or_lost(cluster):
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = _post(cluster, messages=ASK, temperature=0, **extra)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["content"] == "Let me check." + CALL
        assert "tool_calls" not in message
        assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_a_cut_off_tool_call_is_returned_as_text(cluster):
    # reasoning (3 tokens), "Let me check.", then "<tool_call>" is the 5th token: the call's body never comes
    r = _post(cluster, messages=ASK, tools=TOOLS, temperature=0, max_tokens=5)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "Let me check.<tool_call>"
    assert "tool_calls" not in choice["message"]
    # one token more: the body is whole though its end marker is missing, so it is a call
    r = _post(cluster, messages=ASK, tools=TOOLS, temperature=0, max_tokens=6)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_forced_call_is_the_script_s_call(cluster):
    """tool_choice required / named: the grammar starts the reply with the call marker
    (no reasoning, no sentence), and the model's own call, which fits, comes through."""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = _post(cluster, messages=ASK, tools=TOOLS, temperature=0, tool_choice=choice, parallel_tool_calls=False)
        assert r.status_code == 200, r.text
        out = r.json()["choices"][0]
        assert out["finish_reason"] == "tool_calls"
        assert not out["message"].get("content") and "reasoning" not in out["message"]
        (call,) = out["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_a_forced_call_to_another_tool(cluster):
    """Named get_time: the script's call does not fit, so the grammar writes get_time's."""
    zone = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    }
    r = _post(
        cluster,
        messages=ASK,
        tools=TOOLS + [zone],
        temperature=0,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"return_tensors": "np"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    }
                ]
            },
            "messages",
        ),
    ],
)
def test_bad_tool_requests_name_the_field(cluster, body, field):
    r = _post(cluster, **({"messages": ASK} | body))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in (error.get("param") or "") + error["message"]
    assert _post(cluster, messages=ASK, tools=TOOLS).status_code == 200


def test_template_switches_pass_through(cluster):
    r = _post(cluster, messages=ASK, tools=TOOLS, temperature=0, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
