"""What the Ollama, Anthropic and OpenAI Responses surfaces share.

Each surface has its own request models and shapes, but all of them end in the one
internal path the OpenAI routes use: a ``ChatCompletionRequest`` (or ``CompletionRequest``)
prepared by ``Serving``, admitted, and streamed as ``Piece``s. This module holds the steps
between: reading a body in the surface's own model, building the OpenAI request with the
surface's field names in every error, running it (counted by ``/metrics`` and ``/requests``
like every other route), and cutting a reply into typed blocks (reasoning, text, tool
calls) for the two surfaces that stream blocks. No MLX here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from .errors import APIError, validation_error
from .schemas import ChatCompletionRequest, CompletionRequest
from .serving import KEEPALIVE, Piece, Prepared, Serving

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``, whatever Content-Type the client sent (``curl -d`` sends a
    form type; Ollama's own examples do exactly that)."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None


def body_doc(model: type[BaseModel]) -> dict:
    """``openapi_extra`` that documents ``model`` as the route's JSON body in ``/openapi.json``
    (these routes read the body themselves, ``read_body``, so FastAPI cannot see it). The
    model's ``$defs`` are inlined: they would not resolve inside the OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")]) | {
                    k: inline(v) for k, v in node.items() if k != "$ref"
                }
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _prefix(param: str, names: dict[str, str]) -> str | None:
    """The longest OpenAI field path in ``names`` that ``param`` is or lies under."""
    for old in sorted(names, key=len, reverse=True):
        if param == old or param.startswith(old + "."):
            return old
    return None


def _surface_field(param: str | None, names: dict[str, str]) -> str | None:
    """The surface's name for OpenAI field path ``param`` (itself when ``names`` has none)."""
    old = _prefix(param or "", names)
    return param if old is None else names[old] + param[len(old) :]


def renamed(exc: APIError, names: dict[str, str]) -> APIError:
    """``exc`` (raised about an OpenAI field) naming the surface's own field instead.
    ``names`` maps an OpenAI field path (``max_tokens``, ``response_format.json_schema``)
    to the surface's; the longest matching prefix wins."""
    param = exc.param or ""
    old = _prefix(param, names)
    if old is None:
        return exc
    new = names[old] + param[len(old) :]
    message = exc.message
    if message.startswith(param):
        message = new + message[len(param) :]
    elif message.startswith(old):
        message = names[old] + message[len(old) :]
    return APIError(exc.status, message, param=new, code=exc.code, type=exc.type, headers=exc.headers)


def chat_request(body: dict, names: dict[str, str]) -> ChatCompletionRequest:
    """The OpenAI request a surface translated ``body`` into; a problem names the surface's field."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise renamed(validation_error(RequestValidationError(exc.errors())), names) from None


def completion_request(body: dict, names: dict[str, str]) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise renamed(validation_error(RequestValidationError(exc.errors())), names) from None


async def prepare_chat(
    serving: Serving, req: ChatCompletionRequest, names: dict[str, str], *, fill_context: bool = False
) -> Prepared:
    """``Serving.prepare_chat`` (the chat template, lengths, channels) as the OpenAI route runs
    it: on the tokenizing thread, never on the event loop. ``fill_context``: without
    max_tokens, until the model's context is full (``Serving.budget``)."""
    try:
        prepared = await serving.prepare(serving.prepare_chat, req, fill_context=fill_context)
    except APIError as exc:
        raise renamed(exc, names) from None
    return _named(prepared, names)


async def prepare_completion(
    serving: Serving, req: CompletionRequest, names: dict[str, str], *, fill_context: bool = False
) -> Prepared:
    try:
        prepared = await serving.prepare(serving.prepare_completion, req, fill_context=fill_context)
    except APIError as exc:
        raise renamed(exc, names) from None
    return _named(prepared, names)


def _named(prepared: Prepared, names: dict[str, str]) -> Prepared:
    """``prepared`` whose grammar field (named by an error during generation) is the surface's."""
    prepared.grammar_param = _surface_field(prepared.grammar_param, names)
    return prepared


# --- running ------------------------------------------------------------------------
def start(request: Request, prepared: Prepared) -> AsyncIterator:
    """Admit ``prepared`` (429 when full) and run it: ``Piece``s and ``KEEPALIVE``s, recorded
    in ``/requests`` and ``/metrics`` under the route's path, like the OpenAI routes."""
    serving: Serving = request.app.state.serving
    slot = serving.admit()
    disconnected = None if prepared.stream else request.is_disconnected
    return request.app.state.observer.watch(
        request.url.path,
        len(prepared.request.prompt_tokens),
        serving.generate(prepared, slot, disconnected=disconnected),
    )


class ClientLeft(Exception):
    """The client of a non-streamed reply went away before its end: a cancellation, which
    ``watch`` counts as such; nobody reads the answer (errors.install sends a bare 499)."""


async def collect(items: AsyncIterator) -> list[Piece]:
    """Every piece of a non-streamed reply; ClientLeft when the client left before the end
    (as the OpenAI routes, so that no surface counts a cancellation as an error)."""
    pieces = [item async for item in items if item is not KEEPALIVE]
    if not pieces or pieces[-1].finish_reason is None:
        raise ClientLeft()
    return pieces


def completion_tokens(pieces: list[Piece]) -> int:
    return sum(len(p.events) for p in pieces)


def matched_stop(serving: Serving, pieces: list[Piece], stops: list[str]) -> str | None:
    """The stop string that ended the reply, or None when it ended otherwise.

    A stop string ends a reply on a token the engine did not mark as the last, so the
    last event without a finish reason tells it; which string it was is read from the raw
    text of the tokens (stop strings are cut from what the client gets)."""
    if not stops or not pieces or pieces[-1].finish_reason not in ("stop", "tool_calls"):
        return None
    events = [ev for p in pieces for ev in p.events]
    if not events or events[-1].finish_reason is not None:
        return None
    raw = "".join(serving.token_text(ev.token) for ev in events)
    found = [(raw.find(s), s) for s in stops if s in raw]
    return min(found)[1] if found else stops[0]


def call_arguments(call: dict) -> dict:
    """A parsed tool call's arguments (JSON text in OpenAI's shape) as an object."""
    try:
        value = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        return {"_raw": call["function"]["arguments"]}
    return value if isinstance(value, dict) else {"_value": value}


# --- blocks -------------------------------------------------------------------------
@dataclass
class Block:
    """One block of a reply: ``reasoning`` or ``text`` (with its text), or one ``tool_call``
    (an OpenAI-shaped call: id, function.name, function.arguments as JSON text)."""

    index: int
    type: str
    text: str = ""
    call: dict | None = None


@dataclass
class BlockEvent:
    kind: str  # "start" | "delta" | "stop"
    block: Block
    delta: str = ""


@dataclass
class Blocks:
    """Cuts a stream of pieces into a sequence of blocks, as Anthropic's content blocks and
    the Responses API's output items both are: a block opens when its kind first appears,
    closes when another kind starts; a tool call is a whole block of its own."""

    blocks: list[Block] = field(default_factory=list)
    _open: Block | None = None

    def feed(self, piece: Piece) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        for kind, text in (("reasoning", piece.reasoning), ("text", piece.text)):
            if not text:
                continue
            if self._open is None or self._open.type != kind:
                out += self._close()
                self._open = self._new(kind)
                out.append(BlockEvent("start", self._open))
            self._open.text += text
            out.append(BlockEvent("delta", self._open, text))
        for call in piece.tool_calls:
            out += self._close()
            block = self._new("tool_call")
            block.call = {k: v for k, v in call.items() if k != "index"}
            out += [
                BlockEvent("start", block),
                BlockEvent("delta", block, block.call["function"]["arguments"]),
                BlockEvent("stop", block),
            ]
        return out

    def finish(self) -> list[BlockEvent]:
        return self._close()

    async def settle(self, items: AsyncIterator) -> list[Piece]:
        """A non-streamed reply: collect every piece (``collect``), cut them into blocks
        and close the last one; the pieces are returned for usage and finish reasons."""
        pieces = await collect(items)
        for piece in pieces:
            self.feed(piece)
        self.finish()
        return pieces

    def _new(self, kind: str) -> Block:
        block = Block(index=len(self.blocks), type=kind)
        self.blocks.append(block)
        return block

    def _close(self) -> list[BlockEvent]:
        if self._open is None:
            return []
        block, self._open = self._open, None
        return [BlockEvent("stop", block)]


def reasoning_tokens(pieces: list[Piece]) -> int:
    """Tokens spent on reasoning: those of pieces that carried reasoning and nothing else."""
    return sum(len(p.events) for p in pieces if p.reasoning and not p.text and not p.tool_calls)


def dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
