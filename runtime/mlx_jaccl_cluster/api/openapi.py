"""``/openapi.json`` as the server really behaves, so generated clients and fuzzers can trust it.

FastAPI's own schema documents 422 for validation errors (this server answers 400, see
errors.py), nothing for the errors routes raise, and no body for routes that return a
response object themselves. Here every operation gets:

- its success body (the models below, which mirror what routes.py and dashboard.py write;
  streaming requests answer ``text/event-stream``);
- every error status it can answer, each in the one error shape (``ErrorResponse``);
- the served model as the only ``model`` value (any other is a documented 404);
- the API key as a bearer security scheme when one is set (401 and the key throttle's 429).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from . import anthropic, ollama


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors ------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the OpenAI routes send (``api/errors.py``)."""

    error: ErrorDetail


class OllamaError(BaseModel):
    """Errors of Ollama's routes (``/``, ``/api/*``), as Ollama writes them."""

    error: str


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Errors of Anthropic's routes (``/v1/messages*``), as Anthropic writes them."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# --- success bodies -------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: _Open | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: _Open | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Open):
    status: str
    world_size: int
    ranks_up: int
    backend: str
    model: str
    queue_depth: int
    active: int
    uptime_s: float
    detail: str | None = None


class History(BaseModel):
    object: Literal["list"]
    data: list[_Open]


# Before OpenAPI 3.2 the schema of an event stream describes one event.
_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "description": "With stream: true, one server-sent event: a JSON chunk, an error object, or [DONE]",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
        }
    }
}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_NDJSON = {
    "application/x-ndjson": {
        "schema": {
            "type": "string",
            "description": "With stream (Ollama's default), one JSON object a line; an error mid-stream "
            'is an {"error": ...} line',
        }
    }
}
_WHY = {
    400: "The request is invalid (names the field)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "The body is larger than max_body_bytes",
    429: "The queue is full, or too many wrong keys from this address (see Retry-After)",
    503: "The cluster is not ready or lost a rank (Retry-After on generation routes)",
    504: "The request ran past request_timeout",
}
_GENERATION = (400, 404, 413, 429, 503, 504)

# path -> method -> (success model or None, extra success content, error statuses, success status)
_OPERATIONS: dict[str, dict[str, tuple[type[BaseModel] | None, dict, tuple[int, ...]]]] = {
    "/v1/chat/completions": {"post": (ChatCompletion, _SSE, _GENERATION)},
    "/v1/completions": {"post": (Completion, _SSE, _GENERATION)},
    "/v1/models": {"get": (ModelList, {}, ())},
    "/health": {"get": (Health, {}, (503,))},
    "/dashboard/state": {"get": (_Open, {}, ())},
    "/requests": {"get": (History, {}, ())},
    "/errors": {"get": (History, {}, ())},
    "/metrics": {"get": (None, _TEXT, ())},
    # The other client APIs (ollama.py, anthropic.py, responses.py): error bodies in their own shapes.
    "/": {"get": (None, _TEXT, ())},
    "/api/version": {"get": (_Open, {}, ())},
    "/api/tags": {"get": (_Open, {}, (503,))},
    "/api/ps": {"get": (_Open, {}, (503,))},
    "/api/show": {"post": (_Open, {}, (400, 404, 413, 503))},
    "/api/chat": {"post": (_Open, _NDJSON, _GENERATION)},
    "/api/generate": {"post": (_Open, _NDJSON, _GENERATION)},
    "/v1/messages": {"post": (_Open, _SSE, _GENERATION)},
    "/v1/messages/count_tokens": {"post": (_Open, {}, (400, 404, 413, 503))},
    "/v1/responses": {"post": (_Open, _SSE, _GENERATION)},
}
_PUBLIC = ("/health",)


def install(app: FastAPI, model_id: str, keyed: bool) -> None:
    """Replace ``app.openapi`` with the true schema (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, model_id, keyed)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI, model_id: str, keyed: bool) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)

    def ref(model: type[BaseModel]) -> dict:
        full = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(full.pop("$defs", {}))
        schemas[model.__name__] = full
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    shapes = {OllamaError: ollama.is_ollama_path, AnthropicError: anthropic.is_messages_path}
    errors = {model: {"application/json": {"schema": ref(model)}} for model in (ErrorResponse, *shapes)}

    def error_of(path: str) -> dict:
        return next((errors[model] for model, matches in shapes.items() if matches(path)), errors[ErrorResponse])

    if keyed:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            success_model, extra, statuses = _OPERATIONS.get(path, {}).get(method, (None, {}, ()))
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            ok = responses.setdefault("200", {"description": "Successful Response"})
            content = {"application/json": {"schema": ref(success_model)}} if success_model else {}
            if success_model or extra:
                ok["content"] = content | extra
            guarded = keyed and path not in _PUBLIC
            if guarded:
                operation["security"] = [{"apiKey": []}]
            for status in sorted(set(statuses) | ({401, 429} if guarded else set())):
                error = error_of(path)
                body = ok.get("content", error) if path == "/health" else error  # /health's 503 is its own body
                responses[str(status)] = {"description": _WHY[status], "content": body}
    # The only model served; any other name is a documented 404. The OpenAI bodies are
    # components; the other surfaces document theirs inline (adapters.body_doc).
    bodies = [schemas[name] for name in ("ChatCompletionRequest", "CompletionRequest") if name in schemas]
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" not in body:
                bodies.append(body)
    for body in bodies:
        if "model" in body.get("properties", {}):
            body["properties"]["model"] = {"type": "string", "enum": [model_id], "title": "Model"}
    return schema
