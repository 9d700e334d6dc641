"""The Ollama, Anthropic Messages and OpenAI Responses surfaces through 2 real ranks, with
each API's official client (``ollama``, ``anthropic``, ``openai``).

Two clusters, both behind an API key: the scripted model (models/scripted.py: always
reasoning, "Let me check." and one get_weather call) for tool calls and thinking, and the
tiny random llama for text, whose greedy answer depends on the prompt, so "the same
conversation gives the same text as Chat Completions" is a real check.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from conftest import running_cluster

pytestmark = pytest.mark.slow

KEY = "clients-test-key"
REASONING = "The user asks about the weather, so I call the weather tool."
ARGS = {"city": "Paris", "unit": "celsius"}
PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
    "required": ["city"],
}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": PARAMS}}
]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": PARAMS}]
RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": PARAMS}
]
ASK = "What is the weather in Paris?"
#: a bounded schema: a constrained reply always closes well before max_tokens
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def scripted(scripted_qwen2, tmp_path_factory):
    # Many wrong keys on purpose (every route, three ways): the wrong-key throttle (tested in
    # test_guard.py) would answer 429 after the fifth, so it is set out of reach here.
    with running_cluster(
        scripted_qwen2, 2, tmp_path_factory.mktemp("clients-scripted"), api_key=KEY, args=("--api-key-failures", "1000")
    ) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    with running_cluster(tiny_llama, 2, tmp_path_factory.mktemp("clients-tiny"), api_key=KEY) as c:
        yield c


def _ollama(c) -> ollama.Client:
    return ollama.Client(host=c.api, headers={"Authorization": f"Bearer {KEY}"})


def _anthropic(c) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=c.api, api_key=KEY, max_retries=0)  # sends x-api-key


def _openai(c) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url("/v1"), api_key=KEY, max_retries=0)


def _chat_reference(c, messages: list[dict], max_tokens: int, **kw) -> dict:
    """The Chat Completions answer (greedy) for the same conversation."""
    r = httpx.post(
        c.url("/v1/chat/completions"),
        headers=c.headers(),
        timeout=120,
        json={"model": c.model_id, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name three colours."},
]


# --- Ollama -------------------------------------------------------------------------
def test_ollama_discovery(scripted, tiny):
    root = httpx.get(scripted.url("/"), headers=scripted.headers())
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(scripted.url("/"), headers=scripted.headers()).status_code == 200
    version = httpx.get(scripted.url("/api/version"), headers=scripted.headers()).json()["version"]
    assert all(part.isdigit() for part in version.split(".")) and len(version.split(".")) == 3
    assert tuple(map(int, version.split("."))) >= (0, 6, 4)  # VS Code Copilot's minimum

    client = _ollama(scripted)
    (model,) = client.list().models
    assert model.model == scripted.model_id and model.size > 0 and len(model.digest) == 64
    assert model.details.family == "qwen2" and model.details.format == "safetensors"
    shown = client.show(scripted.model_id + ":latest")
    assert shown.modelinfo["general.architecture"] == "qwen2"
    assert shown.modelinfo["qwen2.context_length"] > 0
    assert set(shown.capabilities) == {"completion", "tools", "thinking"}
    assert "<tool_call>" in shown.template
    (running,) = client.ps().models
    assert running.model == scripted.model_id and running.size_vram > 0

    tiny_show = _ollama(tiny).show(tiny.model_id)
    assert tiny_show.capabilities == ["completion"]  # no tool-call format, no reasoning: never null either
    assert tiny_show.modelinfo["general.parameter_count"] > 0


def test_ollama_chat_tool_call_and_thinking(scripted):
    client = _ollama(scripted)
    messages = [{"role": "user", "content": ASK}]
    out = client.chat(
        model=scripted.model_id, messages=messages, tools=OPENAI_TOOLS, options={"temperature": 0}, stream=False
    )
    assert out.done and out.done_reason == "stop"
    assert out.message.content == "Let me check."
    assert out.message.thinking == REASONING
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == ARGS  # an object, not JSON text
    assert out.eval_count == 8 and out.prompt_eval_count > 0
    assert out.total_duration >= out.eval_duration > 0 and out.prompt_eval_duration > 0  # nanoseconds

    # the tool's answer goes back as Ollama sends it: the assistant turn, then a tool message with tool_name
    follow = messages + [
        out.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_name": "get_weather", "content": "18 C and sunny"},
    ]
    again = client.chat(model=scripted.model_id, messages=follow, tools=OPENAI_TOOLS, options={"temperature": 0})
    assert again.prompt_eval_count > out.prompt_eval_count + 10  # the call and its result are in the prompt
    assert again.message.tool_calls[0].function.name == "get_weather"


def test_ollama_chat_streams_ndjson(scripted):
    with httpx.stream(
        "POST",
        scripted.url("/api/chat"),
        headers=scripted.headers(),
        timeout=60,
        json={"model": scripted.model_id, "messages": [{"role": "user", "content": ASK}], "tools": OPENAI_TOOLS},
    ) as r:  # stream is the default
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    assert "".join(line["message"].get("thinking", "") for line in lines) == REASONING
    assert "".join(line["message"]["content"] for line in lines) == "Let me check."
    calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
    assert [c["function"]["arguments"] for c in calls] == [ARGS]
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 8
    assert all(
        isinstance(final[k], int) for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
    )


def test_ollama_text_equals_chat_completions(tiny):
    client = _ollama(tiny)
    want = _chat_reference(tiny, CONVERSATION, 16)["choices"][0]["message"]["content"]
    out = client.chat(model=tiny.model_id, messages=CONVERSATION, options={"temperature": 0, "num_predict": 16})
    assert out.message.content == want
    streamed = "".join(
        part.message.content
        for part in client.chat(
            model=tiny.model_id, messages=CONVERSATION, options={"temperature": 0, "num_predict": 16}, stream=True
        )
    )
    assert streamed == want
    # generate applies the same chat template to system + prompt
    gen = client.generate(
        model=tiny.model_id,
        system=CONVERSATION[0]["content"],
        prompt=CONVERSATION[1]["content"],
        options={"temperature": 0, "num_predict": 16},
    )
    assert gen.response == want and gen.done_reason in ("stop", "length")
    # raw: no template, as /v1/completions
    raw = client.generate(
        model=tiny.model_id, prompt="Once upon a time", raw=True, options={"temperature": 0, "num_predict": 12}
    )
    r = httpx.post(
        tiny.url("/v1/completions"),
        headers=tiny.headers(),
        timeout=60,
        json={"model": tiny.model_id, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12},
    )
    assert raw.response == r.json()["choices"][0]["text"]
    assert raw.done_reason == "length" and raw.eval_count == 12


def test_ollama_stop_and_num_predict(tiny):
    client = _ollama(tiny)
    full = client.chat(model=tiny.model_id, messages=CONVERSATION, options={"temperature": 0, "num_predict": 16})
    text = full.message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the random model's greedy text has no usable stop string")
    cut = client.chat(
        model=tiny.model_id, messages=CONVERSATION, options={"temperature": 0, "num_predict": 16, "stop": [stop]}
    )
    assert cut.message.content == text[: text.find(stop)] and cut.done_reason == "stop"


def test_ollama_num_predict(scripted):
    client = _ollama(scripted)
    ask = [{"role": "user", "content": ASK}]
    assert client.chat(model=MODEL, messages=ask, options={"num_predict": 3}).eval_count == 3
    # -1: until the model ends (or the context is full), not the server's default_max_tokens
    endless = client.chat(model=MODEL, messages=ask, options={"num_predict": -1, "num_ctx": 512, "num_thread": 4})
    assert endless.eval_count == 8 and endless.done_reason == "stop"


def test_ollama_format(scripted):
    """format is structured output: the scripted model would write its script; the schema wins."""
    client = _ollama(scripted)
    out = client.chat(model=MODEL, messages=[{"role": "user", "content": ASK}], format=SCHEMA, options={"seed": 1})
    assert out.done_reason == "stop"
    jsonschema.validate(json.loads(out.message.content), SCHEMA)
    gen = client.generate(model=MODEL, prompt=ASK, format=SCHEMA, stream=False)
    jsonschema.validate(json.loads(gen.response), SCHEMA)
    out = client.chat(
        model=MODEL, messages=[{"role": "user", "content": ASK}], format="json", options={"num_predict": 64}
    )
    assert out.message.content.lstrip().startswith("{")  # any JSON object (unbounded: may be cut by num_predict)


def test_ollama_load_and_management_answers(tiny):
    client = _ollama(tiny)
    loaded = client.generate(model=tiny.model_id)  # no prompt: Ollama loads the model and answers done
    assert loaded.done and loaded.done_reason == "load"
    for call in (
        lambda: client.pull("llama3"),
        lambda: client.delete(tiny.model_id),
        lambda: client.embed(model=tiny.model_id, input="x"),
        lambda: client.copy(tiny.model_id, "other"),
        lambda: client.create("m", from_=tiny.model_id),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 501 and "mlx-jaccl-cluster" in err.value.error


# --- Anthropic ----------------------------------------------------------------------
def test_anthropic_tool_use_thinking_and_round_trip(scripted):
    client = _anthropic(scripted)
    messages = [{"role": "user", "content": ASK}]
    out = client.messages.create(
        model=scripted.model_id,
        max_tokens=1500,
        messages=messages,
        tools=ANTHROPIC_TOOLS,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.type for b in out.content] == ["thinking", "text", "tool_use"]
    assert out.content[0].thinking == REASONING
    assert out.content[1].text == "Let me check."
    tool_use = out.content[2]
    assert tool_use.name == "get_weather" and tool_use.input == ARGS
    assert out.stop_reason == "tool_use" and out.usage.output_tokens == 8
    assert out.id.startswith("msg_") and out.model == scripted.model_id

    follow = messages + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in out.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": tool_use.id,
                    "content": [{"type": "text", "text": "18 C and sunny"}],
                },
                {"type": "text", "text": "Thanks. And tomorrow?"},
            ],
        },
    ]
    again = client.messages.create(model=scripted.model_id, max_tokens=256, messages=follow, tools=ANTHROPIC_TOOLS)
    first_in = out.usage.input_tokens + (out.usage.cache_read_input_tokens or 0)
    again_in = again.usage.input_tokens + (again.usage.cache_read_input_tokens or 0)
    assert again_in > first_in + 10
    counted = client.messages.count_tokens(model=scripted.model_id, messages=follow, tools=ANTHROPIC_TOOLS)
    assert counted.input_tokens == again_in


def test_anthropic_stream_event_sequence(scripted):
    client = _anthropic(scripted)
    kw = dict(
        model=scripted.model_id, max_tokens=256, messages=[{"role": "user", "content": ASK}], tools=ANTHROPIC_TOOLS
    )
    with client.messages.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == ARGS and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 8
    # the raw event names, in Anthropic's order
    with httpx.stream(
        "POST", scripted.url("/v1/messages"), headers={"x-api-key": KEY}, timeout=60, json={**kw, "stream": True}
    ) as r:
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 3
    assert "ping" in names and "content_block_delta" in names
    assert "content_block_delta" in events or "text" in events


def test_anthropic_forced_tool_choice_and_output_format(scripted):
    client = _anthropic(scripted)
    tools = ANTHROPIC_TOOLS + [{"name": "get_time", "description": "Time in a zone", "input_schema": TIME_PARAMS}]
    ask = [{"role": "user", "content": ASK}]
    out = client.messages.create(
        model=MODEL, max_tokens=200, messages=ask, tools=tools, tool_choice={"type": "tool", "name": "get_time"}
    )
    (call,) = [b for b in out.content if b.type == "tool_use"]
    assert call.name == "get_time" and out.stop_reason == "tool_use"
    jsonschema.validate(call.input, TIME_PARAMS)
    out = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ask,
        tools=tools,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert len([b for b in out.content if b.type == "tool_use"]) == 1
    out = client.messages.create(
        model=MODEL, max_tokens=200, messages=ask, output_config={"format": {"type": "json_schema", "schema": SCHEMA}}
    )
    assert out.stop_reason == "end_turn"
    jsonschema.validate(json.loads("".join(b.text for b in out.content if b.type == "text")), SCHEMA)


def test_anthropic_text_equals_chat_completions(tiny):
    client = _anthropic(tiny)
    want = _chat_reference(tiny, CONVERSATION, 16)
    text = want["choices"][0]["message"]["content"]
    # current SDKs no longer take temperature; it is still part of the API, so it goes as an extra field
    greedy = {"temperature": 0}
    out = client.messages.create(
        model=tiny.model_id,
        system=CONVERSATION[0]["content"],
        max_tokens=16,
        extra_body=greedy,
        messages=[{"role": "user", "content": [{"type": "text", "text": CONVERSATION[1]["content"]}]}],
    )
    assert "".join(b.text for b in out.content if b.type == "text") == text
    assert out.stop_reason == ("max_tokens" if want["choices"][0]["finish_reason"] == "length" else "end_turn")
    with client.messages.stream(
        model=tiny.model_id,
        system=[{"type": "text", "text": CONVERSATION[0]["content"], "cache_control": {"type": "ephemeral"}}],
        max_tokens=16,
        extra_body=greedy,
        messages=[CONVERSATION[1]],
        metadata={"user_id": "u1"},
    ) as stream:
        assert "".join(stream.text_stream) == text
    count = client.beta.messages.count_tokens(
        model=tiny.model_id, system=CONVERSATION[0]["content"], messages=[CONVERSATION[1]]
    )  # posts to ...count_tokens?beta=true
    assert count.input_tokens == want["usage"]["prompt_tokens"]
    # a stop sequence cuts the text there and is reported
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = client.messages.create(
            model=tiny.model_id,
            system=CONVERSATION[0]["content"],
            max_tokens=16,
            extra_body=greedy,
            messages=[CONVERSATION[1]],
            stop_sequences=[stop],
        )
        assert cut.content[0].text == text[: text.find(stop)]
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop


# --- OpenAI Responses ---------------------------------------------------------------
def test_responses_text_equals_chat_completions(tiny):
    client = _openai(tiny)
    want = _chat_reference(tiny, CONVERSATION, 16)
    text = want["choices"][0]["message"]["content"]
    out = client.responses.create(
        model=tiny.model_id,
        instructions=CONVERSATION[0]["content"],
        input=CONVERSATION[1]["content"],
        temperature=0,
        max_output_tokens=16,
    )
    assert out.output_text == text
    assert out.id.startswith("resp_") and out.status in ("completed", "incomplete")
    assert out.usage.input_tokens == want["usage"]["prompt_tokens"]
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    # developer role and typed input parts give the same prompt
    again = client.responses.create(
        model=tiny.model_id,
        temperature=0,
        max_output_tokens=16,
        input=[
            {"role": "developer", "content": CONVERSATION[0]["content"]},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": CONVERSATION[1]["content"]}],
            },
        ],
    )
    assert again.output_text == text


def test_responses_stream_ends_with_completed(tiny, scripted):
    client = _openai(tiny)
    text = _chat_reference(tiny, CONVERSATION, 16)["choices"][0]["message"]["content"]
    events = list(
        client.responses.create(
            model=tiny.model_id,
            instructions=CONVERSATION[0]["content"],
            input=CONVERSATION[1]["content"],
            temperature=0,
            max_output_tokens=16,
            stream=True,
        )
    )
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.id == events[0].response.id
    assert events[-1].response.output_text == text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # without max_output_tokens a response may run to the end of the context: it completes
    done = list(_openai(scripted).responses.create(model=MODEL, input=ASK, stream=True))
    assert done[-1].type == "response.completed" and done[-1].response.usage.output_tokens == 8


def test_responses_function_call_round_trip(scripted):
    client = _openai(scripted)
    tools = RESPONSES_TOOLS + [{"type": "web_search"}]  # Codex sends hosted tools: left out, not an error
    out = client.responses.create(
        model=scripted.model_id,
        input=ASK,
        tools=tools,
        temperature=0,
        reasoning={"effort": "medium", "summary": "auto"},
        store=False,
        include=["reasoning.encrypted_content"],
    )
    assert [item.type for item in out.output] == ["reasoning", "message", "function_call"]
    assert out.output[0].content[0].text == REASONING
    assert out.output_text == "Let me check."
    call = out.output[2]
    assert call.name == "get_weather" and json.loads(call.arguments) == ARGS
    assert out.usage.output_tokens == 8 and out.usage.output_tokens_details.reasoning_tokens >= 1

    follow = (
        [{"role": "user", "content": ASK}]
        + [item.model_dump(exclude_none=True) for item in out.output]
        + [{"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}]
    )
    again = client.responses.create(model=scripted.model_id, input=follow, tools=tools, temperature=0)
    assert again.usage.input_tokens > out.usage.input_tokens + 10
    assert again.output[-1].type == "function_call"

    events = list(client.responses.create(model=scripted.model_id, input=ASK, tools=tools, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds and "response.function_call_arguments.done" in kinds
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call"]


def test_responses_text_format_and_forced_calls(scripted):
    client = _openai(scripted)
    out = client.responses.create(
        model=MODEL,
        input=ASK,
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}},
    )
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), SCHEMA)
    tools = RESPONSES_TOOLS + [{"type": "function", "name": "get_time", "parameters": TIME_PARAMS}]
    out = client.responses.create(
        model=MODEL, input=ASK, tools=tools, tool_choice="required", parallel_tool_calls=False, max_output_tokens=200
    )
    assert len([i for i in out.output if i.type == "function_call"]) == 1
    out = client.responses.create(
        model=MODEL,
        input=ASK,
        tools=tools,
        max_output_tokens=200,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "name": "get_time"},
    )
    (call,) = [i for i in out.output if i.type == "function_call"]
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME_PARAMS)


def _sse_events(r: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in r.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_codex_shaped_request(scripted):
    """The fields Codex sends on every turn (codex-rs ResponsesApiRequest), hosted tools included."""
    body = {
        "model": MODEL,
        "instructions": "You are a coding agent.",
        "stream": True,
        "store": False,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "medium", "summary": "auto"},
        "prompt_cache_key": "thread-1",
        "client_metadata": {"session": "s1"},
        "service_tier": "auto",
        "tools": [
            {
                "type": "function",
                "name": "shell",
                "description": "Run a command",
                "strict": False,
                "parameters": {
                    "type": "object",
                    "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                    "required": ["command"],
                },
            }
        ]
        + RESPONSES_TOOLS
        + [{"type": "web_search"}],
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: on"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]},
        ],
    }
    with httpx.stream("POST", scripted.url("/v1/responses"), json=body, headers=scripted.headers(), timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = _sse_events(r)
    assert events[0][1]["type"] == "response.created" and events[0][1]["response"]["id"].startswith("resp_")
    last = events[-1][1]
    assert last["type"] == "response.completed" and last["response"]["id"] == events[0][1]["response"]["id"]
    usage = last["response"]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    done = [e["item"] for _, e in events if e["type"] == "response.output_item.done"]
    # parallel_tool_calls false constrains the reply to an answer or one call (structured output)
    assert done and {i["type"] for i in done} <= {"reasoning", "message", "function_call"}
    assert len([i for i in done if i["type"] == "function_call"]) <= 1
    # the next turn, as Codex sends it: everything so far, a call and the tool's output
    call = {"type": "function_call", "call_id": "call_9", "name": "shell", "arguments": '{"command": ["ls"]}'}
    body["input"] += done + [call, {"type": "function_call_output", "call_id": "call_9", "output": "README.md"}]
    with httpx.stream("POST", scripted.url("/v1/responses"), json=body, headers=scripted.headers(), timeout=60) as r:
        assert _sse_events(r)[-1][1]["type"] == "response.completed"


def test_a_claude_code_shaped_request(scripted):
    """The fields Claude Code sends (beta query string and headers, cache_control, context_management,
    output_config.effort, adaptive thinking, metadata)."""
    body = {
        "model": MODEL,
        "max_tokens": 512,
        "stream": True,
        "metadata": {"user_id": "user_abc"},
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>Today is Monday.</system-reminder>"},
                    {"type": "text", "text": ASK, "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
        "tools": [dict(ANTHROPIC_TOOLS[0], cache_control={"type": "ephemeral"})],
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    }
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"}
    with httpx.stream("POST", scripted.url("/v1/messages?beta=true"), json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = _sse_events(r)
    assert [n for n, _ in events][0] == "message_start" and events[-1][0] == "message_stop"
    delta = next(e for n, e in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"
    starts = [e["content_block"]["type"] for n, e in events if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    count = httpx.post(
        scripted.url("/v1/messages/count_tokens?beta=true"),
        headers=headers,
        timeout=10,
        json={k: v for k, v in body.items() if k not in ("max_tokens", "stream", "metadata")},
    )
    assert count.status_code == 200 and count.json()["input_tokens"] > 0


# --- bad input: each API's own error shape, fast, the cluster still serving -----------
def _ollama_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def _anthropic_error(r: httpx.Response) -> str:
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert (
        body["error"]["type"]
        == {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}[r.status_code]
    )
    return body["error"]["message"]


def _openai_error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"] + " " + str(body["error"]["param"])


def _msgs(model: str, **kw) -> dict:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **kw}


MODEL = "scripted-qwen2"  # the folder name the scripted fixture builds
BAD = {
    "ollama": [
        ("/api/chat", b"{not json", "JSON"),
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "not served"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"mirostat": 1}},
            "options.mirostat",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"num_ctx": 10**7}},
            "options.num_ctx",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": 9}},
            "options.temperature",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"bogus": 1}},
            "options.bogus",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
            "messages.0.images",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "unknown_field": 1},
            "unknown_field",
        ),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "suffix": "end"}, "suffix"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": 0}}, "options.num_predict"),
        ("/api/show", {}, "model"),
        ("/api/chat", {"model": MODEL, "messages": [], "options": {"mirostat": 2}}, "options.mirostat"),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "format": {"type": 5}},
            "format",
        ),
    ],
    "anthropic": [
        ("/v1/messages", b"[1, 2", "JSON"),
        ("/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ("/v1/messages", _msgs("claude-sonnet-4-5"), "not served"),
        ("/v1/messages", _msgs(MODEL, temperature=1.5), "temperature"),
        (
            "/v1/messages",
            _msgs(MODEL, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            "messages.0.content.0",
        ),
        ("/v1/messages", _msgs(MODEL, tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools.0"),
        (
            "/v1/messages",
            _msgs(MODEL, tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool", "name": "nope"}),
            "tool_choice.name",
        ),
        ("/v1/messages", _msgs(MODEL, thinking={"type": "enabled", "budget_tokens": 4096}), "budget_tokens"),
        ("/v1/messages", _msgs(MODEL, mcp_servers=[{"url": "x"}]), "mcp_servers"),
        ("/v1/messages", _msgs(MODEL, stop_sequences=[""]), "stop_sequences"),
        ("/v1/messages/count_tokens?beta=true", {"model": MODEL}, "messages"),
        (
            "/v1/messages",
            _msgs(MODEL, output_config={"format": {"type": "json_schema", "schema": {"type": 5}}}),
            "output_config.format.schema",
        ),
        (
            "/v1/messages",
            _msgs(
                MODEL,
                messages=[
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}
                ],
            ),
            "messages.0.content.0",
        ),
    ],
    "responses": [
        ("/v1/responses", b"\xff", "JSON"),
        ("/v1/responses", {"model": MODEL}, "input"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "conversation": "conv_1"}, "conversation"),
        ("/v1/responses", {"model": "gpt-5", "input": "hi"}, "not served"),
        ("/v1/responses", {"model": MODEL, "input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        (
            "/v1/responses",
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input.0.content.0",
        ),
        ("/v1/responses", {"model": MODEL, "input": "hi", "tools": [{"type": "custom", "name": "x"}]}, "tools.0.type"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "truncation": "auto"}, "truncation"),
        (
            "/v1/responses",
            {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
            "text.format.name",
        ),
        ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 10**6}, "max_output_tokens"),
    ],
}
SHAPES = {"ollama": _ollama_error, "anthropic": _anthropic_error, "responses": _openai_error}


@pytest.mark.parametrize("surface", sorted(BAD))
def test_bad_input_is_a_fast_4xx_in_the_apis_own_shape(scripted, surface):
    assert scripted.model_id == MODEL
    assert len(BAD[surface]) >= 8
    for path, body, names in BAD[surface]:
        start = time.perf_counter()
        if isinstance(body, bytes):
            r = httpx.post(scripted.url(path), content=body, headers=scripted.headers(), timeout=10)
        else:
            r = httpx.post(scripted.url(path), json=body, headers=scripted.headers(), timeout=10)
        took = time.perf_counter() - start
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        message = SHAPES[surface](r)
        assert names in message, (names, message)
        assert took < 1.0, (path, body, took)
    health = httpx.get(scripted.url("/health"))
    assert health.status_code == 200 and health.json()["ranks_up"] == 2
    ok = httpx.post(
        scripted.url("/v1/chat/completions"),
        headers=scripted.headers(),
        timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert ok.status_code == 200


def test_the_key_guards_every_new_route(scripted):
    checks = [
        ("GET", "/", None, _ollama_error),
        ("GET", "/api/version", None, _ollama_error),
        ("GET", "/api/tags", None, _ollama_error),
        ("POST", "/api/chat", {}, _ollama_error),
        ("POST", "/api/show", {}, _ollama_error),
        ("POST", "/api/pull", {}, _ollama_error),
        ("POST", "/v1/messages?beta=true", {}, _anthropic_error),
        ("POST", "/v1/messages/count_tokens?beta=true", {}, _anthropic_error),
        ("POST", "/v1/responses", {}, _openai_error),
    ]
    for method, path, body, shape in checks:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            r = httpx.request(method, scripted.url(path), json=body, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.text)
            assert "API key" in shape(r)
    assert httpx.get(scripted.url("/health")).status_code == 200
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        assert httpx.get(scripted.url("/api/tags"), headers=headers).status_code == 200


def test_new_routes_are_counted_like_the_others(scripted):
    client = _ollama(scripted)
    client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    _anthropic(scripted).messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    _openai(scripted).responses.create(model=MODEL, input="hi", max_output_tokens=2)
    httpx.post(scripted.url("/v1/messages"), json={"model": MODEL}, headers=scripted.headers())  # a 400
    get = lambda path: httpx.get(scripted.url(path), headers=scripted.headers()).json()["data"]  # noqa: E731
    routes = [rec["route"] for rec in get("/requests")[:3]]
    assert set(routes) == {"/api/chat", "/v1/messages", "/v1/responses"}
    assert get("/errors")[0]["route"] == "/v1/messages" and get("/errors")[0]["status"] == 400
    metrics = httpx.get(scripted.url("/metrics"), headers=scripted.headers()).text
    for route in ("/api/chat", "/v1/messages", "/v1/responses"):
        assert f'mjc_generations_total{{route="{route}",status=' in metrics
        assert f'mjc_http_requests_total{{route="{route}",status="200"}}' in metrics
    assert 'mjc_errors_total{route="/v1/messages",type="invalid_request_error"}' in metrics
