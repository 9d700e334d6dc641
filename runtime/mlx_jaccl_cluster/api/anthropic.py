"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``
(Claude Code calls both, with ``?beta=true``; query strings do not take part in routing).

A request is translated into the one OpenAI chat request the engine path takes
(``adapters``): ``system`` first, content blocks into messages (``tool_result`` blocks into
tool messages, ``tool_use`` into tool calls), ``tools`` and ``tool_choice``, sampling,
``thinking`` and ``output_config`` into the chat template's switches and structured output.
The reply comes back as content blocks (``thinking``, ``text``, ``tool_use``), streamed as
Anthropic's named SSE events. Errors are ``{"type": "error", "error": {"type", "message"}}``
with Anthropic's error type for the status. Fields clients always send that have no effect
here (``metadata``, ``cache_control``, ``context_management``, ``service_tier``, earlier
turns' thinking) are accepted and documented in docs/clients.md; any other field we do not
know is refused by name. No MLX here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

from . import adapters
from .errors import APIError, ErrorShape, record
from .schemas import Lenient
from .serving import KEEPALIVE, Piece, Prepared, Serving, event_stream

router = APIRouter()

#: Anthropic's error type for each status (its API reference, "Errors").
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
}
#: Error messages about an OpenAI field name the Anthropic field instead.
NAMES = {
    "stop": "stop_sequences",
    "response_format": "output_config.format",
    "response_format.json_schema.schema": "output_config.format.schema",
    "chat_template_kwargs": "thinking",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}


def error_body(exc: APIError) -> dict:
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def is_messages_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


ERROR_SHAPE = ErrorShape(is_messages_path, error_body)


# --- requests -----------------------------------------------------------------------
class _Block(Lenient):
    # cache_control, citations: no effect here
    cache_control: dict | None = None


class TextBlock(_Block):
    type: Literal["text"]
    text: StrictStr


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr = Field(..., min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: StrictStr | list[dict] = ""
    is_error: StrictBool = False


class ThinkingBlock(_Block):
    type: Literal["thinking", "redacted_thinking"]


class OtherBlock(_Block):
    """A block this server cannot take (image, document...): refused by name when translated."""

    model_config = ConfigDict(extra="allow")
    type: StrictStr


_KNOWN = {"text", "tool_use", "tool_result", "thinking", "redacted_thinking"}


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):  # a missing or non-string type: OtherBlock's validation names it
        return "other"
    if kind in ("thinking", "redacted_thinking"):
        return "thinking"
    return kind if kind in _KNOWN else "other"


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag),
]


class Message(Lenient):
    # "system" in the list: Claude Code appends system reminders mid-conversation
    role: Literal["user", "assistant", "system"]
    content: StrictStr | list[Block]


class ToolDef(Lenient):
    # cache_control and client hints: no effect
    type: StrictStr | None = None
    name: StrictStr = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: StrictStr | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool = False


class Thinking(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = Field(None, ge=1)
    display: StrictStr | None = None


class OutputConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    effort: Literal["low", "medium", "high", "max"] | None = None
    format: dict[str, Any] | None = None


class _Conversation(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: StrictStr = Field(..., min_length=1)
    messages: list[Message] = Field(..., min_length=1)
    system: StrictStr | list[TextBlock] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: dict[str, Any] | None = None  # the older spelling of output_config.format
    # Claude Code sends it on every request and cannot turn it off: accepted, no context edits are made here
    context_management: dict | None = None
    # accepted, no effect on the output: caching is automatic here (prefix reuse), the rest is
    # Anthropic's accounting, routing and diagnostics
    cache_control: dict | None = None
    speed: StrictStr | None = None
    inference_geo: StrictStr | None = None
    diagnostics: dict | None = None
    user_profile_id: StrictStr | None = None
    workspace_id: StrictStr | None = None


class MessagesRequest(_Conversation):
    max_tokens: StrictInt = Field(..., ge=1)
    stream: StrictBool = False
    stop_sequences: list[StrictStr] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=0)
    metadata: dict | None = None  # user id for Anthropic's abuse checks: no effect
    service_tier: StrictStr | None = None  # Anthropic's capacity tiers: no effect


class CountTokensRequest(_Conversation):
    pass


# --- translating --------------------------------------------------------------------
def _refuse_block(where: str, kind: str) -> APIError:
    return APIError(
        400,
        f"{where}: {kind!r} blocks are not supported here (this cluster serves a text model); send text",
        param=where,
    )


def _tool_result_text(block: ToolResultBlock, where: str) -> str:
    if isinstance(block.content, str):
        text = block.content
    else:
        parts = []
        for k, part in enumerate(block.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _refuse_block(f"{where}.content.{k}", str(part.get("type")))
            parts.append(part["text"])
        text = "".join(parts)
    return f"Error: {text}" if block.is_error else text


def _messages(req: _Conversation) -> list[dict]:
    out: list[dict] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict] = []
        for j, block in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ThinkingBlock):
                if m.role != "assistant":
                    raise APIError(400, f"{where}: thinking blocks belong in assistant turns", param=where)
                # an earlier turn's reasoning: not sent back to the model (reasoning models' templates drop it)
            elif isinstance(block, ToolUseBlock):
                if m.role != "assistant":
                    raise APIError(400, f"{where}: tool_use blocks belong in assistant turns", param=where)
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": adapters.dumps(block.input)},
                    }
                )
            elif isinstance(block, ToolResultBlock):
                if m.role != "user":
                    raise APIError(400, f"{where}: tool_result blocks belong in user turns", param=where)
                out.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_result_text(block, where)}
                )
            else:
                raise _refuse_block(where, block.type)
        if m.role == "assistant":
            message: dict = {"role": "assistant", "content": "".join(texts)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        elif texts or not any(isinstance(b, ToolResultBlock) for b in m.content):
            out.append({"role": m.role, "content": "".join(texts)})
    return out


def _tools(req: _Conversation, body: dict) -> None:
    names = []
    for i, tool in enumerate(req.tools or []):
        if tool.type not in (None, "custom"):
            raise APIError(
                400,
                f"tools.{i}: {tool.type!r} is a tool Anthropic's servers run; this server cannot run "
                "it; offer custom tools (name, description, input_schema) only",
                param=f"tools.{i}.type",
            )
        function: dict = {"name": tool.name, "parameters": tool.input_schema or {"type": "object", "properties": {}}}
        if tool.description:
            function["description"] = tool.description
        body.setdefault("tools", []).append({"type": "function", "function": function})
        names.append(tool.name)
    choice = req.tool_choice
    if choice is None:
        return
    if choice.disable_parallel_tool_use:
        body["parallel_tool_calls"] = False
    if choice.type in ("any", "tool") and not names:
        raise APIError(400, f"tool_choice: {choice.type!r} needs tools", param="tool_choice")
    if choice.type == "tool":
        if choice.name not in names:
            raise APIError(
                400,
                f"tool_choice.name: {choice.name!r} is not one of the tools ({', '.join(names)})",
                param="tool_choice.name",
            )
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice.type == "any":
        body["tool_choice"] = "required"
    else:
        body["tool_choice"] = choice.type


def _switches(req: _Conversation, body: dict, max_tokens: int | None) -> None:
    kwargs: dict = {}
    if req.thinking is not None:
        if req.thinking.type == "enabled":
            budget = req.thinking.budget_tokens
            if budget is None:
                raise APIError(
                    400, "thinking.budget_tokens: required when thinking is enabled", param="thinking.budget_tokens"
                )
            if max_tokens is not None and budget >= max_tokens:
                raise APIError(
                    400,
                    f"thinking.budget_tokens ({budget}) must be less than max_tokens ({max_tokens})",
                    param="thinking.budget_tokens",
                )
            kwargs["enable_thinking"] = True
        elif req.thinking.type == "disabled":
            kwargs["enable_thinking"] = False
    config = req.output_config
    if config is not None and config.effort is not None:
        kwargs["reasoning_effort"] = config.effort
    for name, fmt in (
        ("output_config.format", config.format if config else None),
        ("output_format", req.output_format),
    ):
        if fmt is None:
            continue
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(400, f'{name}: give {{"type": "json_schema", "schema": {{...}}}}', param=name)
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if kwargs:
        body["chat_template_kwargs"] = kwargs


async def _prepare(serving: Serving, req: _Conversation, max_tokens: int | None) -> Prepared:
    body: dict = {"model": req.model, "messages": _messages(req)}
    _tools(req, body)
    _switches(req, body, max_tokens)
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stream=req.stream)
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
    return await adapters.prepare_chat(serving, adapters.chat_request(body, NAMES), NAMES)


# --- replies ------------------------------------------------------------------------
def _content(block: adapters.Block) -> dict:
    if block.type == "reasoning":
        return {"type": "thinking", "thinking": block.text, "signature": ""}
    if block.type == "text":
        return {"type": "text", "text": block.text}
    call = block.call or {}
    return {
        "type": "tool_use",
        "id": call["id"],
        "name": call["function"]["name"],
        "input": adapters.call_arguments(call),
    }


def _empty(block: adapters.Block) -> dict:
    if block.type == "reasoning":
        return {"type": "thinking", "thinking": "", "signature": ""}
    if block.type == "text":
        return {"type": "text", "text": ""}
    call = block.call or {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}}


def _delta(block: adapters.Block, text: str) -> dict:
    if block.type == "reasoning":
        return {"type": "thinking_delta", "thinking": text}
    if block.type == "text":
        return {"type": "text_delta", "text": text}
    return {"type": "input_json_delta", "partial_json": text}


class Reply:
    def __init__(self, serving: Serving, prepared: Prepared, stops: list[str]):
        self.serving = serving
        self.prepared = prepared
        self.stops = stops
        self.id = "msg_" + prepared.id
        self.pieces: list[Piece] = []
        self.blocks = adapters.Blocks()

    def usage(self) -> dict:
        prompt = len(self.prepared.request.prompt_tokens)
        cached = self.prepared.cached_tokens
        return {
            "input_tokens": prompt - cached,
            "output_tokens": adapters.completion_tokens(self.pieces),
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }

    def stop(self) -> tuple[str, str | None]:
        reason = self.pieces[-1].finish_reason if self.pieces else None
        matched = adapters.matched_stop(self.serving, self.pieces, self.stops)
        if reason == "length":
            return "max_tokens", None
        if any(b.type == "tool_call" for b in self.blocks.blocks):
            return "tool_use", None
        if matched is not None:
            return "stop_sequence", matched
        return "end_turn", None

    def message(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None, usage: dict) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.serving.model_id,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {adapters.dumps(data)}\n\n"


async def _sse(request: Request, reply: Reply, items: AsyncIterator) -> AsyncIterator[str]:
    start = reply.message(
        [], None, None, {"input_tokens": len(reply.prepared.request.prompt_tokens), "output_tokens": 0}
    )
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    try:
        async for item in items:
            if item is KEEPALIVE:
                yield _event("ping", {"type": "ping"})
                continue
            reply.pieces.append(item)
            for ev in reply.blocks.feed(item):
                yield _block_event(ev)
        for ev in reply.blocks.finish():
            yield _block_event(ev)
        stop_reason, stop_sequence = reply.stop()
        usage = reply.usage()
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage,
            },
        )
        yield _event("message_stop", {"type": "message_stop"})
    except APIError as exc:
        yield _event("error", error_body(record(request, exc)))


def _block_event(ev: adapters.BlockEvent) -> str:
    index = ev.block.index
    if ev.kind == "start":
        return _event(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": _empty(ev.block)}
        )
    if ev.kind == "delta":
        return _event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": _delta(ev.block, ev.delta)}
        )
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


@router.post("/v1/messages", openapi_extra=adapters.body_doc(MessagesRequest))
async def messages(request: Request):
    req = await adapters.read_body(request, MessagesRequest)
    serving: Serving = request.app.state.serving
    prepared = await _prepare(serving, req, req.max_tokens)
    reply = Reply(serving, prepared, prepared.stops)
    items = adapters.start(request, prepared)
    if prepared.stream:
        return event_stream(_sse(request, reply, items))
    reply.pieces = await reply.blocks.settle(items)
    stop_reason, stop_sequence = reply.stop()
    content = [_content(b) for b in reply.blocks.blocks]
    return JSONResponse(reply.message(content, stop_reason, stop_sequence, reply.usage()))


@router.post("/v1/messages/count_tokens", openapi_extra=adapters.body_doc(CountTokensRequest))
async def count_tokens(request: Request) -> dict:
    req = await adapters.read_body(request, CountTokensRequest)
    prepared = await _prepare(request.app.state.serving, req, None)
    return {"input_tokens": len(prepared.request.prompt_tokens)}
