"""OpenAI's Responses API: ``POST /v1/responses`` (Codex speaks only this; so does the
openai-agents SDK by default).

Stateless: nothing is stored, so ``previous_response_id`` and ``conversation`` are refused
with a 400 saying to send the whole conversation as ``input`` (what Codex does). ``input``
(a string or items: messages of any role, ``function_call``, ``function_call_output``,
``reasoning``) and ``instructions`` become the one OpenAI chat request the engine path
takes (``adapters``); the reply comes back as output items (``reasoning``, ``message``,
``function_call``), streamed as the ``response.*`` event family that ends in
``response.completed`` (``response.incomplete`` when cut at ``max_output_tokens``,
``response.failed`` on an error). Hosted tools a local server cannot run (web search, image
generation...: Codex sends some by default) are left out of what the model sees
(``HOSTED_TOOLS``); any other tool type is refused by name. Errors keep OpenAI's shape. No MLX.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from . import adapters
from .errors import APIError, record
from .serving import KEEPALIVE, Piece, Prepared, Serving, event_stream

router = APIRouter()

#: Tools OpenAI's servers run for the model. A local server cannot run them, and Codex sends
#: some of them by default (mlx-lm PR #1207 lists them), so they are left out of the prompt
#: instead of failing every Codex request; the model sees only function tools.
HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "image_generation",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "namespace",
    }
)
#: Error messages about an OpenAI chat field name the Responses field instead.
NAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema": "text.format",
    "chat_template_kwargs": "reasoning.effort",
}


# --- requests -----------------------------------------------------------------------
class TextConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    format: dict[str, Any] | None = None
    verbosity: Literal["medium"] | None = None  # the default; other levels cannot be honoured


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # the reasoning comes back whole, not summarised
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    # Unknown fields are refused by name: a field we do not know may change the output.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: StrictStr = Field(..., min_length=1)
    input: StrictStr | list[dict[str, Any]]
    instructions: StrictStr | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    # accepted, no effect on the output (docs/clients.md)
    store: StrictBool | None = None  # never stored here
    metadata: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None  # Codex's session details
    include: list[Literal["reasoning.encrypted_content"]] | None = None  # reasoning comes back as plain text
    prompt_cache_key: StrictStr | None = None  # the prompt cache matches by prefix, on its own
    prompt_cache_retention: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    user: StrictStr | None = None
    service_tier: StrictStr | None = None
    stream_options: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None
    # refused with a reason when set
    previous_response_id: StrictStr | None = None
    conversation: Any = None
    background: StrictBool | None = None
    max_tool_calls: StrictInt | None = None
    top_logprobs: StrictInt | None = None
    prompt: dict[str, Any] | None = None


# --- translating --------------------------------------------------------------------
def _refuse(field: str, why: str) -> APIError:
    return APIError(400, f"{field}: {why}", param=field, code="unsupported")


def _check_state(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise _refuse(
            "previous_response_id",
            "this server stores no responses (stateless); send the whole conversation as input items instead",
        )
    if req.conversation is not None:
        raise _refuse("conversation", "this server stores no conversations; send the whole conversation as input")
    if req.background:
        raise _refuse("background", "background responses need stored responses, which this server does not keep")
    if req.max_tool_calls is not None:
        raise _refuse("max_tool_calls", "not supported; leave it out")
    if req.top_logprobs:
        raise _refuse("top_logprobs", "not supported on /v1/responses; use /v1/chat/completions with logprobs")
    if req.prompt is not None:
        raise _refuse("prompt", "stored prompt templates live on OpenAI's servers; send instructions and input")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: must be a string or a list of text parts", param=where)
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        else:
            raise APIError(
                400,
                f"{where}.{k}: {kind!r} parts are not supported here (this cluster serves a text "
                "model); send input_text",
                param=f"{where}.{k}",
            )
    return "".join(parts)


def _messages(req: ResponsesRequest) -> list[dict]:
    out: list[dict] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise APIError(400, "input: must not be empty", param="input")
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(
                    400,
                    f"{where}.role: must be user, assistant, system or developer, got {role!r}",
                    param=f"{where}.role",
                )
            # developer instructions are system instructions to a chat template (templates know no "developer")
            out.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _text(item.get("content", ""), f"{where}.content"),
                }
            )
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise APIError(400, f"{where}.{name}: required (a string)", param=f"{where}.{name}")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"] or "{}"},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id: required (a string)", param=f"{where}.call_id")
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _text(item.get("output", ""), f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: not sent back to the model (reasoning templates drop it)
        elif kind == "item_reference":
            raise _refuse(where, "item references need stored items, which this server does not keep; send the item")
        else:
            raise _refuse(
                f"{where}.type",
                f"{kind!r} items are not supported here; send message, function_call, "
                "function_call_output or reasoning items",
            )
    return out


def _tools(req: ResponsesRequest, body: dict) -> None:
    names = []
    for i, tool in enumerate(req.tools or []):
        kind = tool.get("type")
        if kind in HOSTED_TOOLS:
            continue
        if kind != "function":
            raise _refuse(
                f"tools.{i}.type",
                f"{kind!r} tools are not supported here; offer function tools "
                "(hosted tools such as web_search are left out)",
            )
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        body.setdefault("tools", []).append({"type": "function", "function": function})
        names.append(tool.get("name"))
    choice = req.tool_choice
    if choice is None or choice in ("auto", "none"):
        if choice is not None:
            body["tool_choice"] = choice
        return
    if choice == "required":
        body["tool_choice"] = "required"
        return
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        if choice["name"] not in names:
            raise APIError(
                400, f"tool_choice.name: {choice['name']!r} is not one of the function tools", param="tool_choice.name"
            )
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        return
    raise _refuse(
        "tool_choice", f'{choice!r} is not supported; use auto, none, required or {{"type": "function", "name": ...}}'
    )


def _format(req: ResponsesRequest, body: dict) -> None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.get("type") == "text":
        return
    if fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        for name in ("name", "schema"):
            if name not in fmt:
                raise APIError(400, f"text.format.{name}: required with type json_schema", param=f"text.format.{name}")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    else:
        raise _refuse("text.format.type", f"{fmt.get('type')!r}; use text, json_object or json_schema")


def _reasoning(req: ResponsesRequest, body: dict) -> None:
    effort = req.reasoning.effort if req.reasoning else None
    if effort is None:
        return
    if effort == "none":
        body["chat_template_kwargs"] = {"enable_thinking": False}
    else:
        body["chat_template_kwargs"] = {"reasoning_effort": effort}


async def _prepare(serving: Serving, req: ResponsesRequest) -> Prepared:
    _check_state(req)
    body: dict = {"model": req.model, "messages": _messages(req), "stream": req.stream}
    _tools(req, body)
    _format(req, body)
    _reasoning(req, body)
    for ours, theirs in (
        ("max_tokens", "max_output_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ):
        if getattr(req, theirs) is not None:
            body[ours] = getattr(req, theirs)
    # OpenAI: without max_output_tokens a response may run to the end of the context
    return await adapters.prepare_chat(
        serving, adapters.chat_request(body, NAMES), NAMES, fill_context=req.max_output_tokens is None
    )


# --- replies ------------------------------------------------------------------------
def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Reply:
    """One response: its output items (one per block of the reply) and the envelope."""

    def __init__(self, serving: Serving, req: ResponsesRequest, prepared: Prepared):
        self.serving = serving
        self.req = req
        self.prepared = prepared
        self.id = "resp_" + prepared.id
        self.created = int(time.time())
        self.pieces: list[Piece] = []
        self.blocks = adapters.Blocks()
        self.ids: dict[int, str] = {}  # block index -> output item id
        self.seq = 0

    def item_id(self, block: adapters.Block) -> str:
        if block.index not in self.ids:
            prefix = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}[block.type]
            self.ids[block.index] = _item_id(prefix)
        return self.ids[block.index]

    def item(self, block: adapters.Block, done: bool = True) -> dict:
        status = "completed" if done else "in_progress"
        if block.type == "reasoning":
            return {
                "type": "reasoning",
                "id": self.item_id(block),
                "summary": [],
                "content": [{"type": "reasoning_text", "text": block.text}] if done else [],
            }
        if block.type == "text":
            return {
                "type": "message",
                "id": self.item_id(block),
                "status": status,
                "role": "assistant",
                "content": [self.part(block.text)] if done else [],
            }
        call = block.call or {}
        return {
            "type": "function_call",
            "id": self.item_id(block),
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if done else "",
            "status": status,
        }

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def usage(self) -> dict:
        prompt = len(self.prepared.request.prompt_tokens)
        out = adapters.completion_tokens(self.pieces)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": self.prepared.cached_tokens},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": adapters.reasoning_tokens(self.pieces)},
            "total_tokens": prompt + out,
        }

    def envelope(self, status: str, *, final: bool = False, error: dict | None = None) -> dict:
        req = self.req
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
        tools = [t for t in req.tools or [] if t.get("type") == "function"]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.serving.model_id,
            "output": [self.item(b) for b in self.blocks.blocks] if final else [],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": None,
            "reasoning": {
                "effort": req.reasoning.effort if req.reasoning else None,
                "summary": req.reasoning.summary if req.reasoning else None,
            },
            "store": False,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            "tool_choice": req.tool_choice or "auto",
            "tools": tools,
            "truncation": "disabled",
            "usage": self.usage() if final else None,
            "metadata": req.metadata or {},
        }

    def status(self) -> str:
        return "incomplete" if self.pieces and self.pieces[-1].finish_reason == "length" else "completed"

    def event(self, kind: str, **data) -> str:
        body = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: {adapters.dumps(body)}\n\n"

    def block_events(self, ev: adapters.BlockEvent) -> list[str]:
        block, index = ev.block, ev.block.index
        where = {"item_id": self.item_id(block), "output_index": index}
        part = {**where, "content_index": 0}  # text and reasoning items have one content part
        if ev.kind == "start":
            out = [self.event("response.output_item.added", output_index=index, item=self.item(block, done=False))]
            if block.type == "text":
                out.append(self.event("response.content_part.added", **part, part=self.part("")))
            return out
        if ev.kind == "delta":
            if block.type == "text":
                return [self.event("response.output_text.delta", **part, delta=ev.delta, logprobs=[])]
            if block.type == "reasoning":
                return [self.event("response.reasoning_text.delta", **part, delta=ev.delta)]
            return [self.event("response.function_call_arguments.delta", **where, delta=ev.delta)]
        if block.type == "text":
            out = [
                self.event("response.output_text.done", **part, text=block.text, logprobs=[]),
                self.event("response.content_part.done", **part, part=self.part(block.text)),
            ]
        elif block.type == "reasoning":
            out = [self.event("response.reasoning_text.done", **part, text=block.text)]
        else:
            function = (block.call or {})["function"]
            out = [
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    name=function["name"],
                    arguments=function["arguments"],
                )
            ]
        out.append(self.event("response.output_item.done", output_index=index, item=self.item(block)))
        return out


async def _sse(request: Request, reply: Reply, items: AsyncIterator) -> AsyncIterator[str]:
    yield reply.event("response.created", response=reply.envelope("in_progress"))
    yield reply.event("response.in_progress", response=reply.envelope("in_progress"))
    try:
        async for item in items:
            if item is KEEPALIVE:
                yield ": keepalive\n\n"
                continue
            reply.pieces.append(item)
            for ev in reply.blocks.feed(item):
                for line in reply.block_events(ev):
                    yield line
        for ev in reply.blocks.finish():
            for line in reply.block_events(ev):
                yield line
        status = reply.status()
        yield reply.event(f"response.{status}", response=reply.envelope(status, final=True))
    except APIError as exc:
        record(request, exc)
        error = {"code": exc.code or exc.type, "message": exc.message}
        yield reply.event("response.failed", response=reply.envelope("failed", final=True, error=error))


@router.post("/v1/responses", openapi_extra=adapters.body_doc(ResponsesRequest))
async def responses(request: Request):
    req = await adapters.read_body(request, ResponsesRequest)
    serving: Serving = request.app.state.serving
    prepared = await _prepare(serving, req)
    reply = Reply(serving, req, prepared)
    items = adapters.start(request, prepared)
    if prepared.stream:
        return event_stream(_sse(request, reply, items))
    reply.pieces = await reply.blocks.settle(items)
    return JSONResponse(reply.envelope(reply.status(), final=True))
