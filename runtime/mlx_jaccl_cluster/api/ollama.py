"""Ollama's API at the root, as Ollama itself serves it (Open WebUI, Continue, VS Code
Copilot and the ``ollama`` libraries speak it).

``/api/chat`` and ``/api/generate`` are translated into the one OpenAI request the engine
path takes (``adapters``) and their replies back into Ollama's shapes: NDJSON streaming by
default, durations in nanoseconds, tool-call arguments as objects, an error mid-stream as
an ``{"error": ...}`` line. ``options`` map to our sampling; an option that would change
the output and that we cannot honour is refused by name, options that only tune Ollama's
own loading or threads are accepted and have no effect (listed below, and in
docs/clients.md). Model management (pull, create, copy, push, delete) and embeddings
answer 501 saying what to do instead: the cluster serves the one model its inventory names.
Errors are Ollama's ``{"error": "..."}``. No MLX here.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ..ops.manifest import MANIFEST, digest
from . import adapters
from .errors import APIError, ErrorShape, record
from .schemas import Lenient
from .serving import KEEPALIVE, Piece, Prepared, Serving

router = APIRouter()

#: The version of Ollama's API this surface follows (docs/api.md, 2026-08). Clients gate
#: features on it and parse each part as a number (VS Code Copilot needs at least 0.6.4).
OLLAMA_API_VERSION = "0.33.0"
#: Ollama's answer on ``/``: liveness probes compare the text.
ROOT_TEXT = "Ollama is running"
NDJSON = "application/x-ndjson"

#: Options that only tune how Ollama loads and runs a model on one machine: accepted, no effect.
NO_EFFECT_OPTIONS = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "embedding_only",
    }
)
#: Options at the value that turns them off; any other value is refused (we cannot honour it).
NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "penalize_newline": False}
#: Options mapped to a field of the OpenAI request.
SAMPLING_OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
#: Error messages about an OpenAI field name the Ollama field instead.
NAMES = {openai: f"options.{ollama}" for ollama, openai in SAMPLING_OPTIONS.items()} | {
    "response_format": "format",
    "response_format.json_schema.schema": "format",
    "chat_template_kwargs": "think",
}


def error_body(exc: APIError) -> dict:
    return {"error": exc.message}


def is_ollama_path(path: str) -> bool:
    return path == "/" or path.startswith("/api/")


ERROR_SHAPE = ErrorShape(is_ollama_path, error_body)


# --- requests -----------------------------------------------------------------------
class ToolFunction(Lenient):
    name: StrictStr = Field(..., min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(Lenient):
    id: str | None = None
    function: ToolFunction


class Message(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    thinking: str | None = None  # an earlier turn's reasoning: not sent back to the model (templates drop it)
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


Think = StrictBool | Literal["low", "medium", "high"] | None
Format = Literal["", "json"] | dict | None


class _Common(BaseModel):
    # Unknown fields are refused by name: a field we do not know may change the output.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: StrictStr = Field(..., min_length=1)
    stream: StrictBool = True
    format: Format = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | int | None = None  # the model stays loaded anyway: no effect
    think: Think = None
    truncate: StrictBool | None = None  # Ollama's context-shift switches: a prompt never gets truncated here
    shift: StrictBool | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict] | None = None


class GenerateRequest(_Common):
    prompt: StrictStr = ""
    suffix: str | None = None
    system: StrictStr | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: StrictBool = False
    images: list[str] | None = None


class ShowRequest(Lenient):
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: StrictBool = False


# --- translating --------------------------------------------------------------------
def _served(serving: Serving, name: str) -> str:
    """The served model id for ``name``; Ollama names carry a tag (``:latest`` is ours)."""
    base, _, tag = name.partition(":")
    if tag in ("", "latest") and base == serving.model_id:
        return serving.model_id
    return name  # not ours: Serving answers 404 naming the served model


def _options(options: dict | None, body: dict, context: int | None) -> bool:
    """Put Ollama ``options`` into the OpenAI request ``body``; refuse what we cannot honour.
    True when ``num_predict`` asks to generate until the context is full (-1 or -2)."""
    options = dict(options or {})
    penalized = any(
        options.get(k) not in (None, 0, 0.0) for k in ("presence_penalty", "frequency_penalty")
    ) or options.get("repeat_penalty") not in (None, 1, 1.0)
    for name, value in options.items():
        if value is None or name in NO_EFFECT_OPTIONS:
            continue
        if name in SAMPLING_OPTIONS:
            body[SAMPLING_OPTIONS[name]] = value
        elif name in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[name]:
                raise APIError(
                    400,
                    f"options.{name}={value!r} is not supported here; leave it out (or {NEUTRAL_OPTIONS[name]!r}, off)",
                    param=f"options.{name}",
                )
        elif name in ("mirostat_tau", "mirostat_eta"):
            if options.get("mirostat") not in (None, 0):
                raise APIError(400, f"options.{name}: mirostat sampling is not supported", param=f"options.{name}")
        elif name == "repeat_last_n":
            if penalized:
                raise APIError(
                    400,
                    "options.repeat_last_n: the penalty window is fixed here (mlx-lm's 20 tokens); "
                    "leave repeat_last_n out",
                    param="options.repeat_last_n",
                )
        elif name == "num_ctx":
            if type(value) is not int or value < 1:
                raise APIError(
                    400, f"options.num_ctx must be a positive integer, got {value!r}", param="options.num_ctx"
                )
            if context is not None and value > context:
                raise APIError(
                    400,
                    f"options.num_ctx is {value}, but the model's context is {context} tokens; use at most {context}",
                    param="options.num_ctx",
                )
            # smaller: accepted; the prompt is never truncated (a prompt over the model's context is refused)
        elif name == "num_keep":
            continue  # only matters when Ollama truncates a long prompt, which never happens here
        else:
            raise APIError(
                400, f"options.{name} is not an option this server knows; leave it out", param=f"options.{name}"
            )
    predict = body.get("max_tokens")
    if predict in (-1, -2):  # Ollama: until the context is full
        del body["max_tokens"]
        return True
    if predict is not None and (type(predict) is not int or predict < 1):
        raise APIError(
            400,
            f"options.num_predict must be a positive integer, -1 or -2, got {predict!r}",
            param="options.num_predict",
        )
    return False


def _format(fmt: Format, body: dict) -> None:
    if fmt in (None, ""):
        return
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}


def _think(serving: Serving, think: Think, body: dict) -> None:
    if think is None:
        return
    if think is not False and not serving.engine.tokenizer.has_thinking:
        raise APIError(
            400,
            f"think: {serving.model_id!r} does not reason (its template has no think markers); leave think out",
            param="think",
        )
    kwargs = body.setdefault("chat_template_kwargs", {})
    kwargs["enable_thinking"] = think is not False
    if isinstance(think, str):
        kwargs["reasoning_effort"] = think


def _messages(messages: list[Message]) -> list[dict]:
    out: list[dict] = []
    pending: list[dict] = []  # calls of the last assistant turn not yet answered
    for i, m in enumerate(messages):
        if m.images:
            raise APIError(
                400,
                f"messages.{i}.images: this cluster serves a text model; send text only",
                param=f"messages.{i}.images",
            )
        msg: dict = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            calls = [
                {
                    "id": c.id or f"call_{i}_{j}",
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)},
                }
                for j, c in enumerate(m.tool_calls)
            ]
            msg["tool_calls"] = calls
            pending = list(calls)
        elif m.role == "tool":
            match = next((c for c in pending if c["function"]["name"] == m.tool_name), pending[0] if pending else None)
            if m.tool_call_id or match:
                msg["tool_call_id"] = m.tool_call_id or match["id"]
            if match:
                pending.remove(match)
            if m.tool_name:
                msg["name"] = m.tool_name
        out.append(msg)
    return out


async def _prepare_chat(serving: Serving, req: ChatRequest) -> Prepared:
    body: dict = {"model": _served(serving, req.model), "messages": _messages(req.messages), "stream": req.stream}
    if req.tools:
        body["tools"] = req.tools
    fill = _options(req.options, body, serving.engine.context_length)
    _format(req.format, body)
    _think(serving, req.think, body)
    return await adapters.prepare_chat(serving, adapters.chat_request(body, NAMES), NAMES, fill_context=fill)


async def _prepare_generate(serving: Serving, req: GenerateRequest) -> Prepared:
    for name in ("suffix", "template", "context"):
        if getattr(req, name):
            what = {
                "suffix": "fill-in-the-middle (suffix) is not supported; send the prompt only",
                "template": "a per-request template is not supported; the model's own chat template is used "
                "(or raw: true for no template)",
                "context": "context (the deprecated token history) is not supported; use /api/chat with messages",
            }
            raise APIError(400, f"{name}: {what[name]}", param=name)
    if req.images:
        raise APIError(400, "images: this cluster serves a text model; send text only", param="images")
    body: dict = {"model": _served(serving, req.model), "stream": req.stream}
    fill = _options(req.options, body, serving.engine.context_length)
    templated = not req.raw and serving.engine.tokenizer.has_chat_template
    if templated:
        body["messages"] = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}
        ]
        _format(req.format, body)
        _think(serving, req.think, body)
        return await adapters.prepare_chat(serving, adapters.chat_request(body, NAMES), NAMES, fill_context=fill)
    if req.system:
        raise APIError(
            400,
            "system: with raw: true (or a model without a chat template) there is no template to "
            "put it in; prepend it to the prompt",
            param="system",
        )
    if req.format not in (None, "") or req.think is not None:
        name = "format" if req.format not in (None, "") else "think"
        raise APIError(400, f"{name}: needs the chat template; leave raw unset", param=name)
    body["prompt"] = req.prompt
    return await adapters.prepare_completion(
        serving, adapters.completion_request(body, NAMES), NAMES, fill_context=fill
    )


# --- replies ------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _calls(piece_calls: list[dict]) -> list[dict]:
    return [
        {
            "id": c["id"],
            "function": {
                "index": c.get("index", 0),
                "name": c["function"]["name"],
                "arguments": adapters.call_arguments(c),
            },
        }
        for c in piece_calls
    ]


class Reply:
    """One chat or generate reply in Ollama's shapes, with its timings in nanoseconds."""

    def __init__(self, serving: Serving, prepared: Prepared, chat: bool):
        self.serving = serving
        self.prepared = prepared
        self.chat = chat
        self.start = time.perf_counter_ns()
        self.first: int | None = None
        self.tokens = 0

    def _head(self) -> dict:
        return {"model": self.serving.model_id, "created_at": _now()}

    def body(self, text: str, reasoning: str, calls: list[dict]) -> dict:
        out = self._head()
        if self.chat:
            message: dict = {"role": "assistant", "content": text}
            if reasoning:
                message["thinking"] = reasoning
            if calls:
                message["tool_calls"] = _calls(calls)
            out["message"] = message
        else:
            out["response"] = text
            if reasoning:
                out["thinking"] = reasoning
        return out

    async def timed(self, items: AsyncIterator) -> AsyncIterator:
        """``items`` passed through, noting when the first token came and how many came."""
        async for item in items:
            if isinstance(item, Piece):
                if item.events and self.first is None:
                    self.first = time.perf_counter_ns()
                self.tokens += len(item.events)
            yield item

    def chunk(self, piece: Piece) -> dict:
        out = self.body(piece.text, piece.reasoning, piece.tool_calls)
        out["done"] = False
        return out

    def final(self, out: dict, reason: str | None) -> dict:
        end = time.perf_counter_ns()
        first = self.first or end
        out.update(
            done=True,
            done_reason="length" if reason == "length" else "stop",
            total_duration=end - self.start,
            load_duration=0,
            prompt_eval_count=len(self.prepared.request.prompt_tokens),
            prompt_eval_duration=first - self.start,
            eval_count=self.tokens,
            eval_duration=end - first,
        )
        return out


async def _ndjson(request: Request, reply: Reply, items: AsyncIterator) -> AsyncIterator[str]:
    reason = None
    try:
        async for item in items:
            if item is KEEPALIVE:
                continue
            reason = item.finish_reason or reason
            if item.text or item.reasoning or item.tool_calls:
                yield adapters.dumps(reply.chunk(item)) + "\n"
        yield adapters.dumps(reply.final(reply.body("", "", []), reason)) + "\n"
    except APIError as exc:
        yield adapters.dumps(error_body(record(request, exc))) + "\n"


async def _answer(request: Request, prepared: Prepared, chat: bool):
    serving: Serving = request.app.state.serving
    reply = Reply(serving, prepared, chat)
    items = reply.timed(adapters.start(request, prepared))
    if prepared.stream:
        return StreamingResponse(_ndjson(request, reply, items), media_type=NDJSON)
    pieces = await adapters.collect(items)
    out = reply.body(
        "".join(p.text for p in pieces), "".join(p.reasoning for p in pieces), [c for p in pieces for c in p.tool_calls]
    )
    return JSONResponse(reply.final(out, pieces[-1].finish_reason))


def _loaded(serving: Serving, req: ChatRequest | GenerateRequest, chat: bool):
    """Ollama's answer to a request with nothing to generate: it only loads (or unloads) the model."""
    serving._require_ready()
    serving._check_model(_served(serving, req.model))
    _options(req.options, {}, serving.engine.context_length)  # a bad option is refused here too
    out = {
        "model": serving.model_id,
        "created_at": _now(),
        "done": True,
        "done_reason": "unload" if req.keep_alive in (0, "0", "0s") else "load",
    }
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return JSONResponse(out)


@router.post("/api/chat", openapi_extra=adapters.body_doc(ChatRequest))
async def chat(request: Request):
    req = await adapters.read_body(request, ChatRequest)
    serving: Serving = request.app.state.serving
    if not req.messages:
        return _loaded(serving, req, chat=True)
    return await _answer(request, await _prepare_chat(serving, req), chat=True)


@router.post("/api/generate", openapi_extra=adapters.body_doc(GenerateRequest))
async def generate(request: Request):
    req = await adapters.read_body(request, GenerateRequest)
    serving: Serving = request.app.state.serving
    if not req.prompt:
        return _loaded(serving, req, chat=False)
    return await _answer(request, await _prepare_generate(serving, req), chat=False)


# --- the model ----------------------------------------------------------------------
def _parameter_count(folder: Path) -> int:
    """Parameters in the safetensors files, from their headers (no weights are read)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry.get("shape", []):
                    n *= dim
                total += n
    return total


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(count)


class ModelFacts:
    """What Ollama's model listings say about the served model, read once from its folder."""

    def __init__(self, serving: Serving):
        settings = serving.settings
        folder = Path(settings.model)
        config = serving.engine.model_config
        files = [p for p in folder.iterdir() if p.is_file()]
        self.size = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
        self.modified_at = (
            datetime.fromtimestamp(max((p.stat().st_mtime for p in files), default=0), timezone.utc)
            .isoformat()
            .replace("+00:00", "Z")
        )
        manifest = folder / MANIFEST
        if manifest.is_file():  # the controller's manifest: sha256 of every file
            self.digest = digest(json.loads(manifest.read_text()))
        else:  # no manifest (a folder started by hand): names and sizes, not contents
            self.digest = digest({"files": {p.name: {"size": p.stat().st_size} for p in files}})
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        arch = str(config.get("model_type", "unknown"))
        self.arch = arch
        self.parameters = _parameter_count(folder)
        quant = config.get("quantization") or config.get("quantization_config")
        if isinstance(quant, dict) and quant.get("bits"):
            level = f"Q{quant['bits']}"
        else:
            level = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(
                str(config.get("torch_dtype") or text.get("torch_dtype") or ""), "unknown"
            )
        self.details = {
            "parent_model": "",
            "format": "safetensors",
            "family": arch,
            "families": [arch],
            "parameter_size": _human(self.parameters),
            "quantization_level": level,
        }
        self.context = serving.engine.context_length
        self.model_info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": self.parameters}
        if self.context is not None:
            self.model_info[f"{arch}.context_length"] = self.context
        if text.get("hidden_size"):
            self.model_info[f"{arch}.embedding_length"] = text["hidden_size"]
        tokenizer = serving.engine.tokenizer
        self.capabilities = ["completion"]
        if tokenizer.has_tool_calling:
            self.capabilities.append("tools")
        if tokenizer.has_thinking:
            self.capabilities.append("thinking")
        template = getattr(tokenizer, "chat_template", None)
        self.template = template if isinstance(template, str) else ""
        self.parameters_text = f"num_ctx {self.context}" if self.context is not None else ""

    def entry(self, model_id: str) -> dict:
        return {
            "name": model_id,
            "model": model_id,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


def _facts(request: Request) -> ModelFacts:
    serving: Serving = request.app.state.serving
    serving._require_ready()
    facts = getattr(request.app.state, "ollama_facts", None)
    if facts is None:
        facts = request.app.state.ollama_facts = ModelFacts(serving)
    return facts


@router.get("/")
@router.head("/", include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse(ROOT_TEXT)


@router.get("/api/version")
@router.head("/api/version", include_in_schema=False)
async def version() -> dict:
    return {"version": OLLAMA_API_VERSION}


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    return {"models": [_facts(request).entry(request.app.state.serving.model_id)]}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    facts = _facts(request)
    entry = facts.entry(request.app.state.serving.model_id)
    del entry["modified_at"]
    # Loaded for as long as the cluster runs: "expires" far in the future, as Ollama's keep_alive -1 shows it.
    return {
        "models": [
            entry | {"expires_at": "2318-01-01T00:00:00Z", "size_vram": facts.size, "context_length": facts.context}
        ]
    }


@router.post("/api/show", openapi_extra=adapters.body_doc(ShowRequest))
async def show(request: Request) -> dict:
    req = await adapters.read_body(request, ShowRequest)
    name = req.model or req.name
    if not name:
        raise APIError(400, "model: name the model to show (see /api/tags)", param="model")
    facts = _facts(request)
    serving: Serving = request.app.state.serving
    serving._check_model(_served(serving, name))
    return {
        "modelfile": f"# served by mlx-jaccl-cluster\nFROM {serving.model_id}\n",
        "parameters": facts.parameters_text,
        "template": facts.template,
        "details": facts.details,
        "model_info": facts.model_info,
        "capabilities": facts.capabilities,
        "modified_at": facts.modified_at,
    }


_INSTEAD = {
    "pull": "the cluster serves the model its inventory names; to serve another, run `make download MODEL=org/name`, "
    "set it in the inventory and `make up`",
    "push": "models are not pushed from the cluster",
    "create": "models are not created on the cluster; convert one with mlx-lm and serve it through the inventory",
    "copy": "the cluster serves one model under one name (the inventory's model id)",
    "delete": "models are removed on the controller (`make uninstall UNINSTALL_MODELS=true`), not through the API",
    "embed": "this cluster serves a generation model, not an embedding model",
    "embeddings": "this cluster serves a generation model, not an embedding model",
    "blobs": "models are not uploaded through the API; serve one through the inventory",
}


async def _not_here(request: Request) -> Response:
    what = request.url.path.split("/")[2]
    raise APIError(
        501,
        f"{request.method} {request.url.path} is not served by mlx-jaccl-cluster: {_INSTEAD[what]}",
        code="not_supported",
        type="not_supported",
    )


for _name in _INSTEAD:
    router.add_api_route(
        f"/api/{_name}", _not_here, methods=["DELETE"] if _name == "delete" else ["POST"], include_in_schema=False
    )
router.add_api_route("/api/blobs/{digest}", _not_here, methods=["HEAD", "POST"], include_in_schema=False)
