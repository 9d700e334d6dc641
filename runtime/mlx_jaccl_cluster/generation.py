"""The boundary between the HTTP layer and the engine. Plain data, no MLX.

- :class:`Engine`: everything the HTTP side (``api/``) may call on the engine;
  ``engine/core.py`` implements it on its own thread.
- :class:`GenerationRequest` (with its :class:`SamplingParams`): what the HTTP side hands
  the engine; :class:`Ticket`: that request inside the engine; :class:`TokenEvent` /
  :class:`ErrorEvent`: what comes back, delivered through the :data:`Dispatch` the HTTP
  side attached.
- :class:`Step`: rank 0's STEP frame to the other ranks (``cluster.py`` carries it). A
  ``GenerationRequest`` travels inside it, so everything in one must be JSON-serialisable
  and decide the same sampling on every rank.

A request's walk: route -> ``Serving.prepare_*`` (a ``GenerationRequest``) ->
``Engine.submit`` (a ``Ticket``) -> the engine thread's STEP frame to every rank -> one
step -> ``TokenEvent``s back through the dispatcher to the request's sink.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .structured import Grammars

#: The sampling fields that have a default besides the request's own value, and the value
#: used when neither the cluster's settings (``default_<name>``) nor the model's
#: ``generation_config.json`` gives one (OpenAI's defaults; no repetition penalty).
SAMPLING_DEFAULTS: dict[str, float | int | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": None,
}


@dataclass(frozen=True)
class SamplingDefaults:
    """The default of each field in :data:`SAMPLING_DEFAULTS` and where it comes from
    ("settings", "generation_config" or "builtin"). Resolved once, at load; a request's
    own value always wins over it."""

    values: dict
    sources: dict

    @classmethod
    def resolve(cls, settings: dict, generation_config: dict) -> SamplingDefaults:
        """``settings``: the cluster's overrides (None where unset); ``generation_config``:
        the fields the model's file gives (already checked)."""
        values, sources = {}, {}
        for name, builtin in SAMPLING_DEFAULTS.items():
            if settings.get(name) is not None:
                values[name], sources[name] = settings[name], "settings"
            elif generation_config.get(name) is not None:
                values[name], sources[name] = generation_config[name], "generation_config"
            else:
                values[name], sources[name] = builtin, "builtin"
        return cls(values, sources)

    def pick(self, name: str, requested):
        """The request's value when it gave one, else the default."""
        return requested if requested is not None else self.values[name]

    def describe(self) -> dict:
        """For /v1/models and /health: each default with its source."""
        return {name: {"value": self.values[name], "source": self.sources[name]} for name in SAMPLING_DEFAULTS}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> dict:
        data = asdict(self)
        data["logit_bias"] = [[k, v] for k, v in self.logit_bias.items()]
        return data

    @classmethod
    def from_wire(cls, data: dict) -> SamplingParams:
        data = dict(data)
        data["logit_bias"] = {int(k): float(v) for k, v in data.get("logit_bias", [])}
        return cls(**data)


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. ``top_logprobs`` is None when no logprobs were asked.
    ``grammar``: an llguidance grammar (structured.py) every token must follow, or None;
    every rank builds its own matcher from this text."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int | None = None
    grammar: str | None = None

    def to_wire(self) -> dict:
        data = {
            "prompt": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "sampling": self.sampling.to_wire(),
        }
        if self.grammar is not None:
            data["grammar"] = self.grammar
        return data

    @classmethod
    def from_wire(cls, data: dict) -> GenerationRequest:
        return cls(
            prompt_tokens=list(data["prompt"]),
            max_tokens=int(data["max_tokens"]),
            sampling=SamplingParams.from_wire(data["sampling"]),
            grammar=data.get("grammar"),
        )


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last token


#: ErrorEvent.code of a constrained request whose grammar matcher gave up part-way
GRAMMAR_GAVE_UP = "grammar_gave_up"


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    kind: str = "server_error"  # OpenAI error type
    status: int = 500
    code: str = "cluster_error"


class EngineUnavailable(Exception):
    """The engine is not (or no longer) able to take requests."""


@dataclass(eq=False)
class Ticket:
    """One request inside the engine. ``sink`` takes its events, on the HTTP side (the
    engine calls it through the attached dispatcher)."""

    request: GenerationRequest
    sink: Callable[[object], None]
    uid: int | None = None
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused (set before the first token)
    inserted: float | None = None  # perf_counter when it entered the batch (its service time starts)
    submitted: float = field(default_factory=time.perf_counter)


#: Delivers one engine step's events, ``(ticket, event)`` pairs, to their sinks. The engine
#: calls it on its own thread; the HTTP side's dispatcher moves the batch onto its event loop.
Dispatch = Callable[[list[tuple[Ticket, object]]], None]


def direct_dispatch(batch: list[tuple[Ticket, object]]) -> None:
    """Call each sink on the calling thread (until the HTTP side attaches its own)."""
    for ticket, event in batch:
        ticket.sink(event)


class Engine(Protocol):
    """What the HTTP side may call on the engine, and nothing more (``api/`` is typed
    against this; tests/unit/test_engine_boundary.py holds it to that). Everything here is
    safe to call from any thread; the model's facts are there once the cluster is ready."""

    def attach(self, dispatch: Dispatch) -> None:
        """Deliver every event from now on through ``dispatch`` (the HTTP side's event loop)."""

    def submit(self, request: GenerationRequest, sink: Callable[[object], None]) -> Ticket:
        """Queue ``request``; its events go to ``sink``. EngineUnavailable when not ready."""

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for ``ticket`` (client gone, timeout, stop string)."""

    @property
    def tokenizer(self):
        """mlx-lm's TokenizerWrapper of the served model."""

    @property
    def text_machine(self):
        """mlx-lm's reasoning / tool-call state machine for the model's chat template (api/channels.py)."""

    #: the structured-output grammar builder for this vocabulary (structured.py; None until loaded)
    grammars: Grammars | None
    #: what a request that leaves a sampling field out gets (None until loaded)
    sampling_defaults: SamplingDefaults | None

    @property
    def context_length(self) -> int | None:
        """Most tokens one sequence may hold: the model's context capped by max_context."""

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size (config.json), which token ids must stay below."""

    @property
    def model_config(self) -> dict:
        """The model's config.json."""

    @property
    def active(self) -> int:
        """Sequences in the batch now."""


@dataclass(frozen=True)
class Step:
    """One STEP frame: what every rank applies before its next generation step.

    ``checksum``: of the tokens rank 0 saw up to the previous step (a follower whose own
    differs has drifted); ``inserts``: requests to add, in order; ``reused``: prompt tokens
    each insert takes from rank 0's prompt cache (every rank must reuse as many);
    ``alone``: the (one) insert runs on the single-sequence path (``engine/single.py``);
    every rank derives it from the step and checks rank 0's word; ``removes``: uids to drop.
    Or, while idle, ``probe``: one link-probe step to run instead.

    On the wire a compact JSON object with one-letter keys (``c``, ``i``, ``k``, ``l``,
    ``r``, ``p``), the empty ones left out: a STEP frame goes out before every step.
    """

    checksum: int
    inserts: tuple[GenerationRequest, ...] = ()
    reused: tuple[int, ...] = ()
    removes: tuple[int, ...] = ()
    probe: dict | None = None
    alone: bool = False

    def to_wire(self) -> bytes:
        data: dict = {"c": self.checksum}
        if self.probe is not None:
            data["p"] = self.probe
        if self.inserts:
            data["i"] = [r.to_wire() for r in self.inserts]
            data["k"] = list(self.reused)
        if self.alone:
            data["l"] = 1
        if self.removes:
            data["r"] = list(self.removes)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_wire(cls, payload: bytes) -> Step:
        data = json.loads(payload)
        return cls(
            checksum=data.get("c"),
            inserts=tuple(GenerationRequest.from_wire(d) for d in data.get("i", ())),
            reused=tuple(data.get("k", ())),
            removes=tuple(data.get("r", ())),
            probe=data.get("p"),
            alone=bool(data.get("l")),
        )
