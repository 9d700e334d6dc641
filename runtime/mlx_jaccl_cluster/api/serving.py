"""From a validated OpenAI request to a stream of text pieces, and back to OpenAI shapes.

Runs on the HTTP side (asyncio); talks to the engine only through ``generation.Engine``
(``submit`` / ``cancel`` and the tokenizer it loaded). No MLX here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from ..generation import (
    GRAMMAR_GAVE_UP,
    Engine,
    EngineUnavailable,
    ErrorEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from ..settings import Settings
from ..state import ClusterState
from ..structured import StructuredError
from .channels import Channels, initial_state
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat, SamplingFields

KEEPALIVE = object()  # yielded while nothing was generated for keepalive_interval

#: Threads that compile schemas and tool grammars (rank 0). A compile past
#: schema_compile_timeout keeps its thread until llguidance returns; with every thread
#: so held, further schemas get a 429 rather than wait behind them.
SCHEMA_COMPILERS = 2


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events as every surface streams them (OpenAI, Anthropic, Responses): not
    cached, not buffered by a proxy in between."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _event_error(event: ErrorEvent, prepared: Prepared) -> APIError:
    """The engine's error for one request as the HTTP error (a grammar that gave up names
    the field it came from)."""
    param = prepared.grammar_param if event.code == GRAMMAR_GAVE_UP else None
    return APIError(event.status, event.message, type=event.kind, code=event.code, param=param)


@dataclass
class GrammarJob:
    """The grammar a request needs, still to be compiled (``build`` may raise
    StructuredError); ``param`` is the field a refusal names."""

    param: str
    build: Callable[[], str]


@dataclass
class Prepared:
    """A request ready for the engine, plus what the response needs."""

    kind: str  # "chat" | "completion"
    request: GenerationRequest
    stops: list[str]
    stream: bool
    include_usage: bool
    channels: Channels | None = None  # chat replies with reasoning or tool calls
    cached_tokens: int = 0  # prompt tokens the engine took from its prompt cache
    grammar_job: GrammarJob | None = None  # compiled by Serving.prepare into request.grammar
    grammar_param: str | None = None  # the field the grammar came from (named by its errors)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Piece:
    """New text for the client, the tokens behind it, and the finish reason on the last one."""

    text: str
    events: list[TokenEvent]
    finish_reason: str | None = None
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def split(self, channels: Channels | None) -> Piece:
        """This piece with its text divided into content, reasoning and tool calls."""
        if channels is None:
            return self
        parts = channels.feed(self.text, final=self.finish_reason is not None)
        reason = "tool_calls" if self.finish_reason == "stop" and channels.calls_made else self.finish_reason
        return Piece(parts.content, self.events, reason, parts.reasoning, parts.tool_calls)


class TextAssembler:
    """Detokenizes a stream of tokens and applies stop strings.

    Text that could be the start of a stop string is held back until it is known
    not to be one, so a stop string never reaches the client.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self._detok = tokenizer.detokenizer
        self._eos = tokenizer.eos_token_ids
        self._stops = stops
        self._held = ""

    def add(self, event: TokenEvent) -> tuple[str, bool]:
        """Text that may be sent now, and whether a stop string ended the output."""
        final = event.finish_reason is not None
        if not (final and event.finish_reason == "stop" and event.token in self._eos):
            self._detok.add_token(event.token)
        if final:
            self._detok.finalize()
        text = self._held + self._detok.last_segment
        self._held = ""
        if not self._stops:
            return text, False
        cuts = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            return text[: min(cuts)], True
        if final:
            return text, False
        hold = self._partial_stop_length(text)
        if hold:
            self._held = text[-hold:]
            text = text[:-hold]
        return text, False

    def _partial_stop_length(self, text: str) -> int:
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


class Slot:
    """One admitted request. Released exactly once: when its generation ends, or when
    the slot is dropped unused (a streaming response whose client left before it began)."""

    def __init__(self, serving: Serving):
        self._serving = serving
        serving.inflight += 1

    def release(self) -> None:
        if self._serving is not None:
            self._serving.inflight -= 1
            self._serving = None

    __del__ = release


class _Inbox:
    """One request's events, filled by the engine's dispatcher on the event loop.

    Waiting costs one future per wake-up; a single repeating timer (``arm``) marks each
    ``interval`` with no event as an idle tick (keepalive, disconnect check) and wakes
    the reader at the deadline. (``asyncio.wait_for`` per token cost a task and a timer
    for every token.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._interval = 0.0
        self._deadline = 0.0
        self._seen = False  # an event arrived since the last tick
        self._idle = False  # a whole interval passed with no event
        self._ticked = False  # an interval passed, events or not

    def put(self, event: object) -> None:
        self.items.append(event)
        self._seen = True
        self._idle = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arm(self, interval: float, deadline: float) -> None:
        self._interval, self._deadline = interval, deadline
        self._schedule()

    def _schedule(self) -> None:
        at = min(self._loop.time() + self._interval, self._deadline)
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        if not self._seen:
            self._idle = True
        self._ticked = True
        self._seen = False
        self._wake()
        if self._loop.time() < self._deadline:
            self._schedule()

    def idle_tick(self) -> bool:
        """True once per interval that passed with no event."""
        idle, self._idle = self._idle, False
        return idle

    def tick(self) -> bool:
        """True once per interval, whether or not events came (time to look at the client)."""
        ticked, self._ticked = self._ticked, False
        return ticked

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Serving:
    """Validation, admission and the token stream of every generation request."""

    def __init__(self, settings: Settings, state: ClusterState, engine: Engine):
        self.settings = settings
        self.state = state
        self.engine = engine
        self.inflight = 0
        self._token_text: dict[int, str] = {}
        # Chat templates and encoding run here, one at a time, never on the event loop:
        # a multi-megabyte prompt then delays other prompts, not /health or streaming.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mjc-tokenize")
        # Schemas compile on threads of their own (not the tokenizing thread: a slow schema
        # then delays only other schemas), each bounded by schema_compile_timeout.
        self._compiling = ThreadPoolExecutor(max_workers=SCHEMA_COMPILERS, thread_name_prefix="mjc-schema")
        self._max_token_chars: int | None = None
        self.service_s: float | None = None  # recent time a request spends in the batch (moving average)

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        self._compiling.shutdown(wait=False, cancel_futures=True)

    @property
    def model_id(self) -> str:
        return self.settings.served_model_id

    @property
    def capacity(self) -> int:
        return self.settings.max_batch + self.settings.max_queue

    @property
    def queue_depth(self) -> int:
        return max(0, self.inflight - self.settings.max_batch)

    # --- preparing ---------------------------------------------------------------
    async def prepare(self, prepare: Callable, body, **options) -> Prepared:
        """Run ``prepare`` (prepare_chat, prepare_completion...) on the tokenizing thread,
        then compile the grammar it asks for, if any, on a compile thread."""
        call = functools.partial(prepare, body, **options)
        prepared = await asyncio.get_running_loop().run_in_executor(self._tokenizing, call)
        if prepared.grammar_job is not None:
            grammar = await self._compile(prepared.grammar_job)
            prepared.request = dataclasses.replace(prepared.request, grammar=grammar)
            prepared.grammar_param, prepared.grammar_job = prepared.grammar_job.param, None
        return prepared

    async def _compile(self, job: GrammarJob) -> str:
        """``job``'s grammar, or a 400 naming its field: it is invalid, or its compile ran
        past schema_compile_timeout (counted from when a compile thread took it up; the
        compile then finishes in the background and the same schema is refused at once
        after). A 429 when every compile thread stayed busy for that long."""
        limit = self.settings.schema_compile_timeout
        started: list[float] = []

        def run() -> str:
            started.append(time.perf_counter())
            return job.build()

        future = asyncio.wrap_future(self._compiling.submit(run))
        done, _ = await asyncio.wait({future}, timeout=limit)
        if not done and started:
            left = started[0] + limit - time.perf_counter()
            done, _ = await asyncio.wait({future}, timeout=max(left, 0.0))
        if not done:
            future.cancel()  # a compile not yet started is dropped; a running one finishes
            if not started:
                raise APIError(
                    429,
                    f"every schema compiler ({SCHEMA_COMPILERS}) is busy with slow schemas; retry in a few seconds",
                    param=job.param,
                    code="schema_compilers_busy",
                    headers={"Retry-After": str(max(1, math.ceil(limit)))},
                )
            error = self.engine.grammars.too_slow(job.param)
            raise APIError(400, error.message, param=error.param, code="unsupported_schema")
        try:
            return future.result()
        except StructuredError as exc:
            raise APIError(400, exc.message, param=exc.param, code="unsupported_schema") from None

    @property
    def max_token_chars(self) -> int:
        """The most characters one token of this vocabulary stands for (its longest token
        string; byte-level and SentencePiece vocabularies spell a byte or a character with
        one symbol, byte-fallback tokens with more, so this over-counts, never under-)."""
        if self._max_token_chars is None:
            vocab = self.engine.tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1) or 1
        return self._max_token_chars

    def check_prompt_chars(self, chars: int, field: str) -> None:
        """Refuse a prompt that cannot fit the context before tokenizing it whole: text of
        more than context x ``max_token_chars`` characters needs more tokens than the
        context holds, whatever the tokenizer makes of it."""
        context = self.engine.context_length
        if context is None:
            return
        bound = context * self.max_token_chars
        if chars > bound:
            raise APIError(
                400,
                f"{field} holds {chars} characters; the model's context is {context} tokens and one "
                f"token covers at most {self.max_token_chars} characters, so at most {bound} characters "
                "can fit; send a shorter prompt",
                param=field,
                code="context_length_exceeded",
            )

    def _require_ready(self) -> None:
        if not self.state.ready:
            raise APIError(
                503,
                f"cluster is {self.state.phase.replace('_', ' ')}: {self.state.detail}".rstrip(": "),
                code="not_ready",
                headers={"Retry-After": "5"},
            )

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(
                404,
                f"model {name!r} is not served here; this cluster serves {self.model_id!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )

    def prepare_chat(self, req: ChatCompletionRequest, *, fill_context: bool = False) -> Prepared:
        """``fill_context``: without max_tokens, generate until the context is full (see ``budget``)."""
        self._require_ready()
        self._check_model(req.model)
        tokenizer = self.engine.tokenizer
        if not tokenizer.has_chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        tools = req.tools_wanted()
        if tools and not tokenizer.has_tool_calling:
            raise APIError(
                400,
                f"{self.model_id!r} has no tool-call format mlx-lm knows (its chat template names none); "
                "send the request without tools, or serve a model trained for tool calling",
                param="tools",
            )
        template_args = dict(req.chat_template_kwargs or {})
        if tools:
            template_args["tools"] = tools
        self.check_prompt_chars(sum(len(m.text()) for m in req.messages), "messages")
        messages = [m.for_template() for m in req.messages]
        try:
            prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_args))
        except Exception as exc:  # jinja raises for e.g. roles out of order
            raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
        if not all(type(t) is int for t in prompt):  # only token ids may reach the engine (and every rank)
            raise APIError(
                400,
                "the chat template did not return token ids with these chat_template_kwargs",
                param="chat_template_kwargs",
            )
        top = None
        if req.logprobs:
            top = req.top_logprobs or 0
        elif req.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        initial = initial_state(tokenizer, prompt) if tools or tokenizer.has_thinking else "normal"
        job = self._chat_grammar(req, tools, reasoning_first=initial == "reasoning")
        prepared = self._prepared("chat", req, prompt, "messages", max_tokens, top, job, fill_context)
        if tools or tokenizer.has_thinking:
            prepared.channels = Channels(self.engine.text_machine, tokenizer, tools, initial)
        return prepared

    def _chat_grammar(
        self, req: ChatCompletionRequest, tools: list[dict] | None, reasoning_first: bool
    ) -> GrammarJob | None:
        """The grammar a chat reply must follow (to be compiled), or None when nothing
        constrains it.

        With tools on offer, one grammar covers the call (forced by ``tool_choice``,
        checked for ``strict`` tools, one only with ``parallel_tool_calls: false``) and,
        under ``auto``, the answer that calls nothing (the response_format's JSON, else
        free text). Without tools, the response_format's JSON."""
        fmt = req.response_format if req.response_format and req.response_format.constrained else None
        forced = req.forced_choice()
        grammars = self.engine.grammars
        if tools:
            strict = any(t["function"].get("strict") for t in tools)
            why = (
                "tool_choice" if forced else "response_format" if fmt else "tools" if strict else "parallel_tool_calls"
            )
            if forced or fmt or strict or not req.parallel_tool_calls:
                answer = self._format_schema(fmt) if fmt and not forced else None
                parallel = req.parallel_tool_calls
                return GrammarJob(
                    why, lambda: grammars.for_tools(tools, forced or "auto", parallel, answer, reasoning_first, why)
                )
            return None
        if fmt:
            return self._format_job(fmt, reasoning_first)
        return None

    def _format_job(self, fmt: ResponseFormat, reasoning_first: bool) -> GrammarJob:
        grammars = self.engine.grammars
        return GrammarJob(
            grammars.field(fmt.type, "response_format"),
            lambda: grammars.for_response_format(fmt.type, fmt.schema_body, "response_format", reasoning_first),
        )

    @staticmethod
    def _format_schema(fmt: ResponseFormat) -> dict:
        return fmt.schema_body if fmt.type == "json_schema" else {"type": "object"}

    def prepare_completion(self, req: CompletionRequest, *, fill_context: bool = False) -> Prepared:
        self._require_ready()
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            self.check_prompt_chars(len(req.prompt), "prompt")
            prompt = list(self.engine.tokenizer.encode(req.prompt))
        else:
            vocab = self.engine.vocab_size
            bad = [t for t in req.prompt if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise APIError(
                    400,
                    f"prompt holds token ids outside the vocabulary (0..{vocab - 1 if vocab else '?'}): {bad[:5]}",
                    param="prompt",
                )
            prompt = list(req.prompt)
        if not prompt:
            raise APIError(400, "prompt encodes to no tokens", param="prompt")
        fmt = req.response_format
        job = self._format_job(fmt, False) if fmt is not None and fmt.constrained else None
        return self._prepared("completion", req, prompt, "prompt", req.max_tokens, req.logprobs, job, fill_context)

    def _prepared(
        self,
        kind: str,
        req: SamplingFields,
        prompt: list[int],
        prompt_field: str,
        max_tokens: int | None,
        top_logprobs: int | None,
        grammar_job: GrammarJob | None = None,
        fill_context: bool = False,
    ) -> Prepared:
        max_tokens = self.budget(max_tokens, prompt, prompt_field, fill_context)
        vocab = self.engine.vocab_size
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        if vocab is not None and any(k >= vocab for k in bias):
            raise APIError(
                400, f"logit_bias names token ids at or above the vocabulary size {vocab}", param="logit_bias"
            )
        defaults = self.engine.sampling_defaults
        sampling = SamplingParams(
            temperature=defaults.pick("temperature", req.temperature),
            top_p=defaults.pick("top_p", req.top_p),
            top_k=defaults.pick("top_k", req.top_k),
            min_p=defaults.pick("min_p", req.min_p),
            seed=req.seed if req.seed is not None else random.getrandbits(31),
            repetition_penalty=defaults.pick("repetition_penalty", req.repetition_penalty),
            presence_penalty=req.presence_penalty or None,
            frequency_penalty=req.frequency_penalty or None,
            logit_bias=bias,
        )
        gen = GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            top_logprobs=top_logprobs,
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(
            kind=kind,
            request=gen,
            stops=req.stop,
            stream=req.stream,
            include_usage=include_usage,
            grammar_job=grammar_job,
        )

    def budget(self, requested: int | None, prompt: list[int], prompt_field: str, fill_context: bool) -> int:
        """The max_tokens a request runs with, decided here and nowhere else.

        The request's own, refused (400) when the context cannot hold it after the prompt;
        else, with ``fill_context`` (Ollama's ``num_predict: -1``, a Responses request
        without ``max_output_tokens``), the rest of the context; else the server's
        ``default_max_tokens``, capped by that rest. A prompt that fills the context is
        refused here too."""
        context = self.engine.context_length
        if context is None:
            return requested or self.settings.default_max_tokens
        if len(prompt) >= context:
            raise APIError(
                400,
                f"{prompt_field} is {len(prompt)} tokens; the model's context is {context} tokens",
                param=prompt_field,
                code="context_length_exceeded",
            )
        room = context - len(prompt)
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"max_tokens is {requested}, but only {room} tokens fit after the {len(prompt)}-token "
                f"prompt in the {context}-token context",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if requested:
            return requested
        return room if fill_context else min(self.settings.default_max_tokens, room)

    # --- generating --------------------------------------------------------------
    def admit(self) -> Slot:
        """Take a slot or refuse with 429 (call before a response starts)."""
        self._require_ready()
        if self.inflight >= self.capacity:
            wait = self.retry_after()
            raise APIError(
                429,
                f"the server is at capacity ({self.settings.max_batch} generating, "
                f"{self.settings.max_queue} waiting); retry in about {wait} s",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            )
        return Slot(self)

    def retry_after(self) -> int:
        """Seconds until the queue has drained, from its depth and the recent time a request
        spends in the batch (``max_batch`` of them run at once); 1 .. request_timeout."""
        per_request = self.service_s if self.service_s is not None else 1.0
        waves = (self.queue_depth + 1) / self.settings.max_batch
        return max(1, min(math.ceil(waves * per_request), math.ceil(self.settings.request_timeout)))

    def _served(self, seconds: float) -> None:
        self.service_s = seconds if self.service_s is None else 0.8 * self.service_s + 0.2 * seconds

    async def generate(
        self, prepared: Prepared, slot: Slot, disconnected: Callable[[], asyncio.Future[bool]] | None = None
    ) -> AsyncIterator[Piece | object]:
        """Pieces of text as tokens arrive; KEEPALIVE while waiting. Holds ``slot`` until it ends.

        Raises APIError (503 cluster lost, 504 timeout). On exit for any reason the
        request leaves the batch on every rank.
        """
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop)
        try:
            try:
                ticket = self.engine.submit(prepared.request, inbox.put)
            except EngineUnavailable as exc:
                raise APIError(
                    503, f"cluster unavailable: {exc}", code="not_ready", headers={"Retry-After": "5"}
                ) from None
            assembler = TextAssembler(self.engine.tokenizer, prepared.stops)
            deadline = loop.time() + self.settings.request_timeout
            wait = (
                self.settings.keepalive_interval if disconnected is None else min(0.5, self.settings.keepalive_interval)
            )
            events = inbox.items
            finished = engine_done = False
            # One timer per request, not one per token: it wakes the loop below every
            # ``wait`` s (and at the deadline) to send a keepalive or check the client.
            inbox.arm(min(wait, self.settings.request_timeout), deadline)
            try:
                while not finished:
                    if disconnected is not None and inbox.tick() and await disconnected():
                        return  # the client left: a cancellation, even while tokens flow
                    if not events:
                        if loop.time() >= deadline:
                            raise APIError(
                                504, f"request timed out after {self.settings.request_timeout:g} s", code="timeout"
                            )
                        if inbox.idle_tick():
                            if disconnected is None:
                                yield KEEPALIVE
                            continue
                        await inbox.wait()
                        continue
                    event = events.popleft()
                    if isinstance(event, ErrorEvent):
                        raise _event_error(event, prepared)
                    batch = [event]
                    while event.finish_reason is None and events:
                        event = events.popleft()
                        if isinstance(event, ErrorEvent):  # the text before it goes out first
                            events.appendleft(event)
                            break
                        batch.append(event)
                    text = []
                    reason = None
                    used = []
                    for ev in batch:
                        used.append(ev)
                        piece, stopped = assembler.add(ev)
                        text.append(piece)
                        reason = "stop" if stopped else ev.finish_reason
                        if reason is not None:
                            engine_done = not stopped
                            break
                    finished = reason is not None
                    prepared.cached_tokens = ticket.cached_tokens
                    yield Piece("".join(text), used, reason).split(prepared.channels)
            finally:
                inbox.close()
                if not engine_done:
                    self.engine.cancel(ticket)
                elif ticket.inserted is not None:
                    self._served(time.perf_counter() - ticket.inserted)
        finally:
            slot.release()

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.engine.tokenizer.decode([token])
        return text
