"""What the HTTP layer hands the engine and what it gets back. Plain data, no MLX.

A ``GenerationRequest`` travels from rank 0 to every rank (as a dict inside a step
message), so everything in it must be JSON-serialisable and decide the same sampling
on every rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    kind: str = "server_error"  # OpenAI error type
    status: int = 500


class EngineUnavailable(Exception):
    """The engine is not (or no longer) able to take requests."""
