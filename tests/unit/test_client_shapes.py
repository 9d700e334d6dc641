"""The client surfaces' pure parts (api/adapters.py, ollama.py, anthropic.py, responses.py):
blocks, field renames, Ollama options, and an error in the middle of each kind of stream,
written as that API writes it and recorded in the app's error history. The full round trips
through real ranks are in tests/runtime/test_clients.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.requests import Request

from mlx_jaccl_cluster.api import adapters, anthropic, ollama, responses
from mlx_jaccl_cluster.api.errors import APIError
from mlx_jaccl_cluster.api.metrics import Observer
from mlx_jaccl_cluster.api.serving import Piece, Prepared, Serving
from mlx_jaccl_cluster.generation import GenerationRequest, TokenEvent
from mlx_jaccl_cluster.settings import Settings
from mlx_jaccl_cluster.state import ClusterState

CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}


def _piece(text="", reasoning="", calls=(), finish=None, tokens=1) -> Piece:
    return Piece(text, [TokenEvent(7)] * tokens, finish, reasoning, list(calls))


def test_blocks_open_close_and_take_each_call_whole():
    blocks = adapters.Blocks()
    events = []
    for piece in (
        _piece(reasoning="a"),
        _piece(reasoning="b"),
        _piece(text="c"),
        _piece(calls=[CALL]),
        _piece(text="d", finish="stop"),
    ):
        events += blocks.feed(piece)
    events += blocks.finish()
    assert [(b.type, b.text) for b in blocks.blocks] == [
        ("reasoning", "ab"),
        ("text", "c"),
        ("tool_call", ""),
        ("text", "d"),
    ]
    assert [(e.kind, e.block.index) for e in events] == [
        ("start", 0),
        ("delta", 0),
        ("delta", 0),
        ("stop", 0),
        ("start", 1),
        ("delta", 1),
        ("stop", 1),
        ("start", 2),
        ("delta", 2),
        ("stop", 2),
        ("start", 3),
        ("delta", 3),
        ("stop", 3),
    ]
    assert events[8].delta == '{"a": 1}' and "index" not in blocks.blocks[2].call


def test_errors_name_the_surfaces_own_field():
    exc = APIError(
        400, "max_tokens is 9000, but only 100 tokens fit", param="max_tokens", code="context_length_exceeded"
    )
    out = adapters.renamed(exc, ollama.NAMES)
    assert out.param == "options.num_predict" and out.message.startswith("options.num_predict is 9000")
    assert out.code == "context_length_exceeded"
    out = adapters.renamed(APIError(400, "messages.2.content: bad", param="messages.2.content"), responses.NAMES)
    assert out.param == "input.2.content" and out.message == "input.2.content: bad"
    same = APIError(400, "model: x", param="model")
    assert adapters.renamed(same, responses.NAMES) is same


def test_a_grammar_that_gives_up_during_generation_names_the_surfaces_field():
    # Serving.generate names Prepared.grammar_param, which the adapters set to the surface's field
    field = "response_format.json_schema.schema"
    assert adapters._surface_field(field, ollama.NAMES) == "format"
    assert adapters._surface_field(field, anthropic.NAMES) == "output_config.format.schema"
    assert adapters._surface_field(field, responses.NAMES) == "text.format.schema"
    assert adapters._surface_field(field, {}) == field
    assert adapters._surface_field(None, ollama.NAMES) is None


@pytest.mark.parametrize(
    "options, refused",
    [
        ({"num_thread": 8, "use_mmap": True, "num_gpu": 99, "mirostat": 0, "tfs_z": 1.0, "num_keep": 4}, None),
        ({"repeat_last_n": 64}, None),  # no penalty asked: the window changes nothing
        ({"repeat_last_n": 64, "repeat_penalty": 1.2}, "options.repeat_last_n"),
        ({"mirostat": 2}, "options.mirostat"),
        ({"typical_p": 0.5}, "options.typical_p"),
        ({"num_ctx": 4096}, "options.num_ctx"),  # beyond the 2048-token context
        ({"num_predict": 0}, "options.num_predict"),
        ({"flash": True}, "options.flash"),
    ],
)
def test_ollama_options(options, refused):
    body: dict = {}
    if refused is None:
        ollama._options(options, body, 2048)
        return
    with pytest.raises(APIError) as err:
        ollama._options(options, body, 2048)
    assert err.value.param == refused and err.value.status == 400


def test_ollama_options_map_to_sampling():
    body: dict = {}
    fill = ollama._options(
        {
            "temperature": 0.2,
            "top_k": 5,
            "min_p": 0.1,
            "seed": 3,
            "stop": ["x"],
            "num_predict": 7,
            "repeat_penalty": 1.1,
            "num_ctx": 1024,
        },
        body,
        2048,
    )
    assert not fill
    assert body == {
        "temperature": 0.2,
        "top_k": 5,
        "min_p": 0.1,
        "seed": 3,
        "stop": ["x"],
        "max_tokens": 7,
        "repetition_penalty": 1.1,
    }
    body = {}
    assert ollama._options({"num_predict": -1}, body, 2048) and "max_tokens" not in body


# --- an error in the middle of a stream ---------------------------------------------------
@pytest.fixture
def parts(tmp_path: Path):
    app = FastAPI()
    app.state.observer = Observer()
    request = Request({"type": "http", "method": "POST", "path": "/x", "headers": [], "query_string": b"", "app": app})
    settings = Settings(model=tmp_path / "m")
    serving = Serving(settings, ClusterState(world_size=1, backend="ring", model_id="m"), engine=None)
    prepared = Prepared(
        kind="chat",
        request=GenerationRequest(prompt_tokens=[1, 2, 3], max_tokens=8),
        stops=[],
        stream=True,
        include_usage=False,
    )
    return app, request, serving, prepared


async def _failing():
    yield _piece(text="Hel")
    raise APIError(503, "rank 1 lost", code="cluster_error", type="service_unavailable")


def _drain(gen) -> list[str]:
    async def run():
        return [chunk async for chunk in gen]

    return asyncio.run(run())


def test_ollama_stream_error_is_an_error_line(parts):
    app, request, serving, prepared = parts
    reply = ollama.Reply(serving, prepared, chat=True)
    lines = [json.loads(line) for line in "".join(_drain(ollama._ndjson(request, reply, _failing()))).splitlines()]
    assert lines[0]["message"]["content"] == "Hel" and lines[0]["done"] is False
    assert lines[-1] == {"error": "rank 1 lost"}
    assert app.state.observer.errors[-1].message == "rank 1 lost"


def test_anthropic_stream_error_is_an_error_event(parts):
    app, request, serving, prepared = parts
    reply = anthropic.Reply(serving, prepared, [])
    chunks = _drain(anthropic._sse(request, reply, _failing()))
    assert chunks[0].startswith("event: message_start\n")
    assert chunks[-1].startswith("event: error\n")
    body = json.loads(chunks[-1].split("data: ", 1)[1])
    assert body == {"type": "error", "error": {"type": "api_error", "message": "rank 1 lost"}}
    assert app.state.observer.errors[-1].status == 503


def test_responses_stream_error_is_response_failed(parts):
    app, request, serving, prepared = parts
    req = responses.ResponsesRequest(model="m", input="hi", stream=True)
    reply = responses.Reply(serving, req, prepared)
    chunks = _drain(responses._sse(request, reply, _failing()))
    last = json.loads(chunks[-1].split("data: ", 1)[1])
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "cluster_error", "message": "rank 1 lost"}
    assert last["response"]["id"] == json.loads(chunks[0].split("data: ", 1)[1])["response"]["id"]
    assert [json.loads(c.split("data: ", 1)[1])["sequence_number"] for c in chunks] == list(range(len(chunks)))
    assert app.state.observer.errors[-1].route == "other"


def test_openapi_documents_the_new_bodies(tmp_path):
    import warnings

    from mlx_jaccl_cluster.api.app import create_app

    app = create_app(
        Settings(model=tmp_path / "m"), ClusterState(world_size=1, backend="ring", model_id="m"), engine=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. duplicate operation ids
        spec = app.openapi()
    for path in (
        "/api/chat",
        "/api/generate",
        "/api/show",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    ):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "object" and "model" in schema["properties"], path
    assert "$defs" not in json.dumps(spec)
    messages = spec["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "max_tokens" in messages["required"]


@pytest.mark.parametrize("kind", [{}, [], 3, None])
def test_an_anthropic_block_whose_type_is_not_a_string_is_a_validation_error(kind):
    """Found by the schemathesis fuzz: {"type": {}} raised TypeError (a 500) while choosing the block class."""
    from pydantic import ValidationError

    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": kind}]}]}
    with pytest.raises(ValidationError, match="type"):
        anthropic.MessagesRequest.model_validate(body)
