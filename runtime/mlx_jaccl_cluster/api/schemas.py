"""OpenAI request models. Unknown fields are ignored, as OpenAI's own SDKs send many;
fields we cannot honour (``n`` > 1, ``echo``) are rejected by name.

Validation is strict (no "1" for 1, no 1 for true) and every refusal a validator makes is
also a constraint of the JSON schema, so /openapi.json says exactly what is accepted:
generated clients and fuzzers can trust it. The one loosening: an integer field takes a
JSON number with no fraction (``1.0``), which JSON Schema counts as an integer too.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from annotated_types import Ge
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, field_validator, model_validator


def _whole_number(value: object) -> object:
    return int(value) if type(value) is float and value.is_integer() else value


#: An integer as JSON Schema means it: 3 or 3.0, never "3", true or 3.5.
JSONInt = Annotated[int, Strict(), BeforeValidator(_whole_number)]
TokenId = Annotated[int, Strict(), Ge(0), BeforeValidator(_whole_number)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Lenient(BaseModel):
    """The base of every request model that ignores fields it does not know (clients send
    many: OpenAI's SDKs, Claude Code's ``cache_control``, Ollama's hints) while still
    validating strictly those it does. Models whose unknown fields could change the output
    refuse them instead (``extra="forbid"``, e.g. ``ollama._Common``)."""

    model_config = ConfigDict(extra="ignore", strict=True)


#: Arguments of ``apply_chat_template`` itself (transformers), not switches of the template:
#: ``chat_template_kwargs`` may not set them (return_tensors, say, would change what comes back).
TEMPLATE_CALL_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "processor_kwargs",
    }
)


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(Lenient):
    name: str = Field(..., min_length=1)
    arguments: str = Field("{}", description="JSON text, as OpenAI sends it")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"arguments must be JSON text ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object")
        return value


class ToolCall(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates expect it (tool-call arguments as objects)."""
        message: dict = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(Lenient):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class Tool(Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class JSONSchemaFormat(Lenient):
    """``response_format.json_schema``: OpenAI's shape. The schema is always enforced,
    ``strict`` or not (a looser guarantee would be a silent one)."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict = Field(..., alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Lenient):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (JSON valid against ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type json_schema needs json_schema: {"name": ..., "schema": {...}}')
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"

    @property
    def schema_body(self) -> dict | None:
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else None


class NamedFunction(Lenient):
    name: str = Field(..., min_length=1)


class ToolChoiceFunction(Lenient):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call that function."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Lenient):
    include_usage: StrictBool = False


class SamplingFields(Lenient):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: JSONInt | None = Field(None, ge=1)
    # None: not given; the server's default applies (settings, the model's
    # generation_config.json, else OpenAI's: see generation.SamplingDefaults).
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: JSONInt | None = Field(None, ge=0)
    min_p: Probability | None = None
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]
        | None
    ) = None
    seed: JSONInt | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    n: JSONInt = Field(1, ge=1, le=1, description="Only n=1 is supported.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: JSONInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: JSONInt | None = Field(None, ge=0, le=10)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool = True
    chat_template_kwargs: dict[str, StrictBool | str | int | float] | None = Field(
        None, json_schema_extra={"propertyNames": {"not": {"enum": sorted(TEMPLATE_CALL_ARGUMENTS)}}}
    )

    @model_validator(mode="after")
    def _choice_needs_tools(self) -> ChatCompletionRequest:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs tools")
        return self

    def forced_choice(self) -> str | dict | None:
        """ "required", {"name": ...} for a named function, or None (not forced)."""
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return {"name": self.tool_choice.function.name}
        return "required" if self.tool_choice == "required" else None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_arguments(cls, value: dict | None) -> dict | None:
        reserved = sorted(set(value or ()) & TEMPLATE_CALL_ARGUMENTS)
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)} cannot be set here: these are arguments of the templating call, "
                "decided by the server and the request's own fields; only the template's own switches "
                "(e.g. enable_thinking) may be set"
            )
        return value

    def tools_wanted(self) -> list[dict] | None:
        """The tools as plain dicts when the model may call them, else None."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(SamplingFields):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
    logprobs: JSONInt | None = Field(None, ge=0, le=10)
    echo: StrictBool = Field(False, json_schema_extra={"enum": [False]}, description="Only false is supported.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value
