"""Structured output, forced tool calls and sampling defaults through 2-rank clusters,
tensor and pipeline, on a random-weight model.

Random weights make it certain that the constraint, not the model, produced the
structure: unconstrained, this model writes gibberish. Every schema here bounds its
strings, arrays and extra keys, so a constrained reply always closes well before
``max_tokens`` (an unbounded one may run to ``max_tokens`` and end ``length``).

The model is the tiny qwen2 (it has a pipeline split) with two additions: a chat template
that renders tools the Hermes/Qwen way (so mlx-lm infers the json_tools call format,
whose markers are plain text for this vocabulary) and a ``generation_config.json``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import running_cluster

from mlx_jaccl_cluster.models.scripted import TOOLS_TEMPLATE
from mlx_jaccl_cluster.models.tiny import build_tiny_model

pytestmark = pytest.mark.slow

GENERATION_CONFIG = {"temperature": 0.0, "top_p": 0.9, "top_k": 40}
SETTINGS_TOP_P = "0.8"  # MJC_DEFAULT_TOP_P: the cluster overrides the file's top_p
# MJC_SCHEMA_COMPILE_TIMEOUT: far above the milliseconds the grammars here take (2.3 ms at
# most on an idle machine, tools included, 43 times less), below SLOW_SCHEMA's compile
# (0.27 s idle, more under load).
# llguidance's own limits cap what a valid schema under max_schema_bytes may cost (about
# 1000 numeric ranges hit its lexer limit), so the margin comes from a small timeout.
COMPILE_TIMEOUT = 0.1
SLOW_SCHEMA = {
    "type": "object",
    "properties": {
        f"n{i}": {"type": "number", "minimum": -123456.789 * i, "maximum": 98765.4321 * i} for i in range(1, 700)
    },
}
#: A schema llguidance compiles and validates at once, but whose parser passes its limit
#: (2000 items in a row) as soon as the object opens: 600 optional properties, any may come next.
GIVES_UP = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(600)}}

S = {"type": "string", "maxLength": 12}  # a bounded string
ASK = [{"role": "user", "content": "Describe a person as JSON."}]

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "note": S},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "address": {
                "type": "object",
                "properties": {"city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            }
        },
        "required": ["address"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, S]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"at": {"type": "string", "format": "date-time"}},
        "required": ["at"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "person"}, "name": S},
        "required": ["kind", "name"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"nick": {"type": ["string", "null"], "maxLength": 8}},
        "required": ["nick"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "people": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"name": S},
                    "required": ["name"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["people"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"enum": [1, 2, 3, "many"]},
    {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ],
        "properties": {"a": {}, "b": {}},
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 6}},
        "required": ["word"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
        "required": ["n"],
        "additionalProperties": False,
    },
    {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}, "maxProperties": 2},
    {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 5},
            "y": {"type": "integer", "minimum": 0, "maximum": 5},
        },
        "required": ["x"],
        "additionalProperties": False,
    },
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time in a zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def model(models_dir) -> Path:
    """tiny-qwen2 plus a tool-call chat template and a generation_config.json."""
    base = build_tiny_model(models_dir / "tiny-qwen2-structured-base", arch="qwen2")
    out = models_dir / "tiny-qwen2-structured"
    if not out.exists():
        shutil.copytree(base, out)
        config = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TOOLS_TEMPLATE}))
        (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return out


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def cluster(request, model, tmp_path_factory):
    with running_cluster(
        model,
        2,
        tmp_path_factory.mktemp(f"structured-{request.param}"),
        parallel=request.param,
        env={"MJC_DEFAULT_TOP_P": SETTINGS_TOP_P, "MJC_SCHEMA_COMPILE_TIMEOUT": str(COMPILE_TIMEOUT)},
    ) as c:
        yield c


def _post(cluster, path="/v1/chat/completions", **body) -> httpx.Response:
    return httpx.post(cluster.url(path), json={"model": cluster.model_id, **body}, timeout=120)


def _schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_every_schema_is_followed(cluster):
    """Greedy and seeded sampling: each reply parses and validates, and ends by itself."""
    for i, schema in enumerate(SCHEMAS):
        jsonschema.Draft202012Validator.check_schema(schema)
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": i}):
            messages = [{"role": "user", "content": f"Example {i}: answer as JSON."}]
            r = _post(cluster, messages=messages, max_tokens=200, response_format=_schema_format(schema), **sampling)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop", (schema, choice)
            value = json.loads(choice["message"]["content"])
            jsonschema.validate(value, schema)


def test_unconstrained_output_is_not_json(cluster):
    """The control: the same model and prompt without response_format is no JSON at all."""
    r = _post(cluster, messages=ASK, max_tokens=30, temperature=0)
    with pytest.raises(ValueError):
        json.loads(r.json()["choices"][0]["message"]["content"])


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user"]
    tags: list[Literal["x", "y"]] = pydantic.Field(max_length=2)


def test_openai_parse_helper(cluster):
    client = openai.OpenAI(base_url=cluster.url("/v1"), api_key="unused", max_retries=0)
    out = client.chat.completions.parse(
        model=cluster.model_id, messages=ASK, response_format=Person, temperature=0, max_tokens=200
    )
    person = out.choices[0].message.parsed
    assert isinstance(person, Person)
    assert out.choices[0].finish_reason == "stop"


def test_streamed_chunks_concatenate_to_valid_json(cluster):
    """json_object (any object: greedy, since sampled keys of an open object need not end)
    and a schema, streamed: the deltas join into the JSON."""
    client = openai.OpenAI(base_url=cluster.url("/v1"), api_key="unused", max_retries=0)
    cases = [({"type": "json_object"}, {"type": "object"}, {"temperature": 0}, f"Item {i} as JSON.") for i in range(3)]
    cases += [(_schema_format(SCHEMAS[13]), SCHEMAS[13], {"temperature": 1.0, "seed": i}, "People?") for i in range(3)]
    for response_format, schema, sampling, prompt in cases:
        stream = client.chat.completions.create(
            model=cluster.model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=300,
            stream=True,
            response_format=response_format,
            **sampling,
        )
        chunks = [c for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_completions_take_a_schema_too(cluster):
    schema = SCHEMAS[0]
    r = _post(
        cluster,
        "/v1/completions",
        prompt="A person:",
        max_tokens=200,
        temperature=0,
        response_format=_schema_format(schema),
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


#: long enough that a second request can arrive while it decodes
LONG = {
    "type": "object",
    "properties": {
        "story": {"type": "string", "minLength": 120, "maxLength": 140},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    },
    "required": ["story", "scores"],
    "additionalProperties": False,
}


def test_a_lone_request_handed_over_mid_json_stays_valid(cluster):
    """A constrained request that arrives to an idle engine runs on the single-sequence
    path (masked there); a second request arriving while it streams moves it into the
    batch mid-JSON, matcher and all: both replies parse and validate, on every layout."""
    r = _post(cluster, messages=ASK, max_tokens=300, temperature=0, response_format=_schema_format(LONG))
    assert r.status_code == 200, r.text
    alone = r.json()["choices"][0]
    assert alone["finish_reason"] == "stop", alone
    jsonschema.validate(json.loads(alone["message"]["content"]), LONG)

    events: list = []

    def stream():
        body = {
            "model": cluster.model_id,
            "messages": ASK,
            "max_tokens": 300,
            "temperature": 0,
            "stream": True,
            "response_format": _schema_format(LONG),
        }
        with httpx.stream("POST", cluster.url("/v1/chat/completions"), json=body, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append((time.monotonic(), json.loads(line[6:])))

    runner = threading.Thread(target=stream)
    runner.start()
    deadline = time.monotonic() + 120
    while len(events) < 4:
        assert time.monotonic() < deadline and runner.is_alive(), "the streamed request gave no tokens"
        time.sleep(0.005)
    joined_at = time.monotonic()
    second = _post(
        cluster, messages=ASK, max_tokens=200, temperature=1.0, seed=3, response_format=_schema_format(SCHEMAS[0])
    )
    runner.join(120)
    assert not runner.is_alive()
    assert second.status_code == 200, second.text
    jsonschema.validate(json.loads(second.json()["choices"][0]["message"]["content"]), SCHEMAS[0])
    assert events[-1][0] > joined_at, "the second request must have arrived while the first decoded"
    chunks = [c for _, c in events if c.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert text == alone["message"]["content"]  # greedy: the hand-over changed no token
    jsonschema.validate(json.loads(text), LONG)


def test_cut_off_json_ends_with_length(cluster):
    r = _post(cluster, messages=ASK, max_tokens=3, temperature=0, response_format=_schema_format(SCHEMAS[0]))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])


def _call_arguments(choice: dict) -> list[tuple[str, dict]]:
    assert choice["finish_reason"] == "tool_calls", choice
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]]


def _params(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def test_forced_tool_calls_follow_the_tool_schema(cluster):
    for seed in range(4):
        sampling = {"temperature": 0} if seed == 0 else {"temperature": 1.0, "seed": seed}
        # required, one call only
        r = _post(
            cluster,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            **sampling,
        )
        assert r.status_code == 200, r.text
        calls = _call_arguments(r.json()["choices"][0])
        assert len(calls) == 1
        for name, args in calls:
            jsonschema.validate(args, _params(name))
        # a named function
        # a named function (one call: with parallel calls allowed, random weights may
        # go on calling until max_tokens)
        r = _post(
            cluster,
            messages=ASK,
            tools=TOOLS,
            max_tokens=200,
            parallel_tool_calls=False,
            **sampling,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        ((name, args),) = _call_arguments(r.json()["choices"][0])
        assert name == "get_time"
        jsonschema.validate(args, _params("get_time"))


STRICT_TOOLS = [{"type": "function", "function": t["function"] | {"strict": True}} for t in TOOLS]


def test_auto_with_strict_tools_and_a_response_format(cluster):
    """What openai-agents sends for an agent with tools and an output type: the reply is
    the schema's JSON or a call whose arguments fit its (strict) tool."""
    schema = SCHEMAS[1]
    for seed in range(4):
        r = _post(
            cluster,
            messages=ASK,
            tools=STRICT_TOOLS,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            parallel_tool_calls=False,
            response_format=_schema_format(schema),
        )
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            for name, args in _call_arguments(choice):
                jsonschema.validate(args, _params(name))
        else:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize(
    "body, field, words",
    [
        (
            {"response_format": _schema_format({"type": "array", "uniqueItems": True})},
            "response_format.json_schema.schema",
            ["uniqueItems"],
        ),
        (
            {"response_format": _schema_format({"not": {"type": "string"}})},
            "response_format.json_schema.schema",
            ["not"],
        ),
        ({"response_format": _schema_format({"type": "strin"})}, "response_format.json_schema.schema", ["strin"]),
        (
            {"response_format": _schema_format({"$ref": "#/$defs/missing"})},
            "response_format.json_schema.schema",
            ["missing"],
        ),
        (
            {"response_format": _schema_format({"type": "string", "pattern": "[a-"})},
            "response_format.json_schema.schema",
            ["regex"],
        ),
        (
            {"response_format": _schema_format(json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40))},
            "response_format.json_schema.schema",
            ["deep"],
        ),
        (
            {
                "response_format": _schema_format(
                    {
                        "type": "object",
                        "properties": {f"k{i}": {"type": "string", "description": "x" * 100} for i in range(700)},
                    }
                )
            },
            "response_format.json_schema.schema",
            ["bytes"],
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
        ({"response_format": {"type": "yaml"}}, "response_format", []),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", ["nope"]),
        ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "strict": True, "parameters": {"type": "object", "not": {}}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
            ["not"],
        ),
    ],
)
def test_bad_structure_requests_are_named_quickly(cluster, body, field, words):
    started = time.perf_counter()
    r = _post(cluster, **({"messages": ASK} | body))
    elapsed = time.perf_counter() - started
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in (error.get("param") or "") + error["message"], error
    for word in words:
        assert word in error["message"], error
    assert elapsed < 1.0
    assert _post(cluster, messages=ASK, max_tokens=4).status_code == 200  # still serving


def test_schemas_compile_while_others_stream(cluster):
    """While a reply streams, an invalid, a too large and a too slow schema each get a 400
    naming the field, the first two in under a second, the slow one at its compile limit;
    the stream keeps going meanwhile (the compile runs on its own thread) and the same slow
    schema, sent again once its compile is over, is refused at once."""
    arrivals: list[float] = []

    def stream():
        body = {"model": cluster.model_id, "messages": ASK, "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", cluster.url("/v1/chat/completions"), json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())

    streaming = threading.Thread(target=stream)
    streaming.start()
    deadline = time.perf_counter() + 120
    while len(arrivals) < 3 and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert len(arrivals) >= 3, "the stream never started"
    field = "response_format.json_schema.schema"
    for schema, words, limit in [
        ({"type": "array", "uniqueItems": True}, ["uniqueItems"], 1.0),
        ({"type": "object", "properties": {f"k{i}": {"description": "x" * 100} for i in range(700)}}, ["bytes"], 1.0),
        (SLOW_SCHEMA, ["schema_compile_timeout"], COMPILE_TIMEOUT + 1.0),
    ]:
        started = time.perf_counter()
        r = _post(cluster, messages=ASK, response_format=_schema_format(schema))
        elapsed = time.perf_counter() - started
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and all(w in error["message"] for w in words), error
        assert elapsed < limit, (words, elapsed)
    slow_sent = started
    # Once its compile has finished in the background, the same schema is refused at once,
    # saying how long it took ("takes longer": timed out again; 429: both compile threads
    # still busy with it).
    deadline = time.perf_counter() + 90
    while True:
        time.sleep(3.0)
        started = time.perf_counter()
        r = _post(cluster, messages=ASK, response_format=_schema_format(SLOW_SCHEMA))
        elapsed = time.perf_counter() - started
        assert r.status_code in (400, 429), r.text
        if "took" in r.json()["error"]["message"] or time.perf_counter() > deadline:
            break
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field, error
    assert "schema_compile_timeout" in error["message"] and "took" in error["message"], error
    assert elapsed < 1.0
    assert any(slow_sent < t < slow_sent + 3.0 for t in arrivals), "no token arrived while the schema compiled"
    streaming.join(timeout=300)
    assert len(arrivals) > 3 and arrivals[-1] > slow_sent
    assert _post(cluster, messages=ASK, max_tokens=4).status_code == 200  # still serving


def test_a_schema_the_matcher_gives_up_on_is_an_error_not_broken_json(cluster):
    """The matcher gives up after the reply's "{": the reply is a 400 naming the field and
    the reason (not "{" with finish_reason stop), a stream ends with that error, and the
    cluster keeps serving."""
    body = {"messages": ASK, "max_tokens": 40, "temperature": 0, "response_format": _schema_format(GIVES_UP)}
    r = _post(cluster, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "grammar_gave_up", error
    assert "max is 2000" in error["message"] and "simplify" in error["message"], error
    url = cluster.url("/v1/chat/completions")
    with httpx.stream("POST", url, json={"model": cluster.model_id, **body, "stream": True}, timeout=120) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "grammar_gave_up", data
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-2])
    assert text == "{"
    assert _post(cluster, messages=ASK, max_tokens=4).status_code == 200  # still serving


def test_sampling_defaults_are_shown_and_applied(cluster):
    health = httpx.get(cluster.url("/health")).json()["sampling_defaults"]
    assert health["temperature"] == {"value": 0.0, "source": "generation_config"}
    assert health["top_p"] == {"value": float(SETTINGS_TOP_P), "source": "settings"}
    assert health["top_k"] == {"value": 40, "source": "generation_config"}
    assert health["min_p"]["source"] == "builtin"
    (entry,) = httpx.get(cluster.url("/v1/models")).json()["data"]
    assert entry["sampling_defaults"] == health
    # no temperature: the file's 0 (greedy), the same as asking for it; a request's own value wins
    greedy = _post(cluster, messages=ASK, max_tokens=16, temperature=0).json()["choices"][0]["message"]["content"]
    default = _post(cluster, messages=ASK, max_tokens=16).json()["choices"][0]["message"]["content"]
    hot = _post(cluster, messages=ASK, max_tokens=16, temperature=2.0, top_p=1.0, seed=3).json()
    assert default == greedy
    assert hot["choices"][0]["message"]["content"] != greedy
