"""The OpenAI routes. Each turns a request into a ``Prepared`` one, runs it through
``Serving.generate`` and writes OpenAI's JSON or SSE shapes."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, record
from .schemas import ChatCompletionRequest, CompletionRequest
from .serving import KEEPALIVE, Piece, Prepared, Serving, event_stream

router = APIRouter()


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _logprob(value: float) -> float:
    """JSON has no -inf (a token a penalty or bias ruled out): OpenAI's convention, -9999.0."""
    return value if math.isfinite(value) else -9999.0


class OpenAIShape:
    """Chat and text completions differ only in a few field names; this holds them."""

    def __init__(self, serving: Serving, prepared: Prepared):
        self.serving = serving
        self.p = prepared
        self.chat = prepared.kind == "chat"
        self.object = "chat.completion" if self.chat else "text_completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + prepared.id
        self.completion_tokens = 0

    def _envelope(self, obj: str, choices: list) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.p.created,
            "model": self.serving.model_id,
            "choices": choices,
        }

    def usage(self) -> dict:
        prompt = len(self.p.request.prompt_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.p.cached_tokens},
        }

    def logprobs(self, pieces: list[Piece]) -> dict | None:
        if self.p.request.top_logprobs is None:
            return None
        events = [ev for piece in pieces for ev in piece.events]
        text = self.serving.token_text
        if self.chat:

            def entry(token: int, lp: float) -> dict:
                t = text(token)
                return {"token": t, "logprob": _logprob(lp), "bytes": list(t.encode())}

            return {
                "content": [
                    {**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs or []]}
                    for ev in events
                ]
            }
        offsets, pos = [], 0
        for ev in events:
            offsets.append(pos)
            pos += len(text(ev.token))
        return {
            "tokens": [text(ev.token) for ev in events],
            "token_logprobs": [_logprob(ev.logprob) for ev in events],
            "top_logprobs": [{text(t): _logprob(lp) for t, lp in ev.top_logprobs or []} for ev in events],
            "text_offset": offsets,
        }

    def choice(self, pieces: list[Piece], finish: str | None, *, delta: bool) -> dict:
        text = "".join(p.text for p in pieces)
        choice: dict = {"index": 0}
        if self.chat:
            reasoning = "".join(p.reasoning for p in pieces)
            calls = [call for p in pieces for call in p.tool_calls]
            if delta:
                message = {"content": text} if text or not (reasoning or calls) else {}
            else:  # a whole message: content is null beside tool calls, and calls carry no index
                message = {"role": "assistant", "content": text if text or not calls else None}
                calls = [{k: v for k, v in call.items() if k != "index"} for call in calls]
            if reasoning:
                message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choice["delta" if delta else "message"] = message
        else:
            choice["text"] = text
        choice["logprobs"] = self.logprobs(pieces)
        choice["finish_reason"] = finish
        return choice

    def complete(self, pieces: list[Piece]) -> dict:
        body = self._envelope(self.object, [self.choice(pieces, pieces[-1].finish_reason, delta=False)])
        body["usage"] = self.usage()
        return body

    def chunk(self, piece: Piece | None, *, first: bool = False) -> str:
        if first:
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        elif piece is None:  # the usage-only chunk
            body = self._envelope(self.object + ".chunk" if self.chat else self.object, [])
            body["usage"] = self.usage()
            return f"data: {_dumps(body)}\n\n"
        else:
            choice = self.choice([piece], piece.finish_reason, delta=True)
        return f"data: {_dumps(self._envelope(self.object + '.chunk' if self.chat else self.object, [choice]))}\n\n"


async def _run(request: Request, prepared: Prepared):
    serving: Serving = request.app.state.serving
    shape = OpenAIShape(serving, prepared)
    slot = serving.admit()
    disconnected = None if prepared.stream else request.is_disconnected
    items = request.app.state.observer.watch(
        request.url.path,
        len(prepared.request.prompt_tokens),
        serving.generate(prepared, slot, disconnected=disconnected),
    )
    if not prepared.stream:
        pieces: list[Piece] = []
        async for item in items:
            if isinstance(item, Piece):
                pieces.append(item)
                shape.completion_tokens += len(item.events)
        if (
            not pieces or pieces[-1].finish_reason is None
        ):  # the client left: a cancellation (watch counts it), not an error
            return Response(status_code=499)
        return JSONResponse(shape.complete(pieces))
    return event_stream(_sse(request, shape, prepared, items))


async def _sse(request: Request, shape: OpenAIShape, prepared: Prepared, items: AsyncIterator) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield shape.chunk(None, first=True)
        async for item in items:
            if item is KEEPALIVE:
                yield ": keepalive\n\n"
                continue
            assert isinstance(item, Piece)
            shape.completion_tokens += len(item.events)
            if (
                item.text
                or item.reasoning
                or item.tool_calls
                or item.finish_reason
                or prepared.request.top_logprobs is not None
            ):
                yield shape.chunk(item)
        if prepared.include_usage:
            yield shape.chunk(None)
    except APIError as exc:
        yield f"data: {_dumps(record(request, exc).body())}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    return await _run(request, await serving.prepare(serving.prepare_chat, body))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    serving: Serving = request.app.state.serving
    return await _run(request, await serving.prepare(serving.prepare_completion, body))


@router.get("/v1/models")
async def models(request: Request) -> dict:
    serving: Serving = request.app.state.serving
    entry = {
        "id": serving.model_id,
        "object": "model",
        "created": int(serving.state.started),
        "owned_by": "mlx-jaccl-cluster",
    }
    defaults = serving.engine.sampling_defaults
    if defaults is not None:  # known once the model is loaded
        entry["sampling_defaults"] = defaults.describe()
    return {"object": "list", "data": [entry]}
