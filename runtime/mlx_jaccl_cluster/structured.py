"""Structured output: ``response_format`` and forced tool calls as llguidance grammars.

The HTTP side (rank 0) turns a request's JSON schema, or its tools and ``tool_choice``,
into one llguidance grammar and validates it against the model's tokenizer, so that a
schema llguidance cannot enforce is a 400 naming the field and the keyword before
anything reaches the engine. The grammar text then travels in the request's wire form,
and every rank builds the same matcher from it (``engine/grammar.py``): the same
grammar, fed the same tokens, gives the same mask on every rank.

No MLX here: llguidance and its tokenizer are plain CPU code.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: How generated JSON is laid out: ``{"a": 1, "b": [1, 2]}`` (json.dumps' default). No
#: free whitespace: a model (or random weights) cannot spend its tokens on blank space,
#: and every rank's output is the same bytes. The server's options override any
#: ``x-guidance`` a client puts in its schema (which could, say, turn on ``lenient``).
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", ", "lenient": False}

#: Grammars (or refusals) kept per request shape, so that a client sending the same schema
#: again skips the compile (milliseconds, up to ``schema_compile_timeout``).
GRAMMARS_KEPT = 64

#: Tool-call families whose call is a JSON object ``{"name", "arguments"}`` between the
#: start and end markers, with the text the family may write around the object (optional
#: in the grammar) and between calls (mlx-lm's ``tool_parsers`` module name -> (before
#: the object, after it, between calls)).
JSON_CALL_FAMILIES = {
    "json_tools": ("\n", "\n", "\n"),  # Hermes, Qwen2.5, Qwen3: <tool_call>\n{...}\n</tool_call>
}


class StructuredError(Exception):
    """A request asks for structure this server cannot enforce; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


def schema_depth(value, depth: int = 0) -> int:
    """Nesting depth of a JSON value (a bare scalar is 0, ``{}`` is 1)."""
    if isinstance(value, dict):
        return max((schema_depth(v, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((schema_depth(v, depth + 1) for v in value), default=depth + 1)
    return depth


@dataclass
class Marker:
    """A tool-call or think marker as a grammar item: its one token, else its text."""

    lark: str

    @classmethod
    def of(cls, text: str, tokens) -> Marker:
        if tokens and len(tokens) == 1:
            return cls(f"<[{int(tokens[0])}]>")
        return cls(json.dumps(text))


class Grammars:
    """The llguidance tokenizer of one loaded model, and the grammars built on it.

    ``tokenizer`` is mlx-lm's TokenizerWrapper; ``vocab_size`` the width of the model's
    logits (the mask covers every logit). When llguidance cannot take the tokenizer,
    ``unsupported`` says why and every request for structure gets a 400 saying so.

    Every outcome (the grammar, or the error) is kept for the next request of the same
    shape, with the seconds it took: one that took longer than ``compile_timeout`` (the
    HTTP side stopped waiting for it) is refused at once from then on. Thread-safe.
    """

    def __init__(
        self, tokenizer, vocab_size: int | None, max_bytes: int, max_depth: int, compile_timeout: float | None = None
    ):
        self.tokenizer = tokenizer
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.compile_timeout = compile_timeout
        self._kept: OrderedDict[str, tuple[str | None, StructuredError | None, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.lltokenizer = None
        self.unsupported: str | None = None
        try:
            import llguidance.hf

            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            n_vocab = max(vocab_size or 0, len(hf)) or None
            self.lltokenizer = llguidance.hf.from_tokenizer(
                hf, n_vocab=n_vocab, eos_token=sorted(tokenizer.eos_token_ids)
            )
        except Exception as exc:  # slow (Python) tokenizers, odd vocabularies...
            self.unsupported = f"llguidance cannot use this model's tokenizer ({type(exc).__name__}: {exc})"

    @property
    def vocab_size(self) -> int:
        return self.lltokenizer.vocab_size

    # --- the grammars ------------------------------------------------------------
    @staticmethod
    def field(kind: str, param: str) -> str:
        """The request field a ``response_format`` grammar's errors name."""
        return f"{param}.json_schema.schema" if kind == "json_schema" else param

    def for_response_format(self, kind: str, schema: dict | None, param: str, reasoning_first: bool) -> str:
        """The grammar of ``response_format`` ``json_object`` (any object) or ``json_schema``."""
        self._require_tokenizer(param)
        key = json.dumps(["format", kind, schema, param, reasoning_first], default=str)
        return self._kept_or_built(
            key, self.field(kind, param), lambda: self._response_format(kind, schema, param, reasoning_first)
        )

    def _response_format(self, kind: str, schema: dict | None, param: str, reasoning_first: bool) -> str:
        from llguidance import LLMatcher

        field = self.field(kind, param)
        body = {"type": "object"} if kind == "json_object" else schema
        if not reasoning_first:
            if not isinstance(body, dict):
                raise StructuredError(f"{field} must be a JSON Schema object", field)
            self._check_size(body, field)
            return self._validated(LLMatcher.grammar_from_json_schema(body, overrides=JSON_OPTIONS), field)
        self._check_schema(body, field)
        prefix, think = self._reasoning(param)
        lines = [f"start: {prefix} answer", f"answer: %json {self._inline(body)}", think]
        return self._lark(lines, field)

    def for_tools(
        self,
        tools: list[dict],
        choice: str | dict,
        parallel: bool,
        answer: dict | None,
        reasoning_first: bool,
        why: str = "tool_choice",
    ) -> str:
        """The grammar of a reply that calls ``tools`` (OpenAI function tools, as dicts).

        ``choice``: "required" (one call or more, nothing else), ``{"name": ...}`` (a
        call to that function), or "auto" (text that opens no call, then calls or none;
        only strict tools' arguments are checked; nothing may follow the calls). ``parallel``: more than one call allowed. ``answer``:
        the response_format schema the reply must be when it calls no tool ("auto" only).
        ``why``: the request field that made a grammar necessary (named in errors).
        """
        self._require_tokenizer(why)
        key = json.dumps(["tools", tools, choice, parallel, answer, reasoning_first, why], default=str)
        return self._kept_or_built(key, why, lambda: self._tools(tools, choice, parallel, answer, reasoning_first, why))

    def _tools(self, tools, choice, parallel: bool, answer, reasoning_first: bool, why: str) -> str:
        start, end, before, after, between = self._call_format(why)
        chosen = tools
        if isinstance(choice, dict):
            chosen = [t for t in tools if t["function"]["name"] == choice["name"]]
            if not chosen:
                names = ", ".join(t["function"]["name"] for t in tools)
                raise StructuredError(
                    f"tool_choice names function {choice['name']!r}, which is not among the request's tools ({names})",
                    "tool_choice",
                )
        strict_all = choice != "auto"
        variants = []
        for tool in chosen:
            fn = tool["function"]
            strict = strict_all or bool(fn.get("strict"))
            params = fn.get("parameters")
            param_name = f"tools[{tools.index(tool)}].function.parameters"
            if params is None:
                params = {"type": "object", "properties": {}, "additionalProperties": False}
            elif strict:
                params = self._check_schema(params, param_name)
            else:
                params = {"type": "object"}
            variants.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": fn["name"]}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        call_schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        self._check_size(call_schema, "tools")
        lines = [
            f"call: {start.lark} {_optional(before)} %json {self._inline(call_schema)} {_optional(after)} {end.lark}",
            f"calls: call ({_optional(between)} call)*" if parallel else "calls: call",
        ]
        prefix = ""
        if reasoning_first:
            prefix, think = self._reasoning("tools")
            prefix += " "
            lines.append(think)
        if choice != "auto":
            lines.insert(0, f"start: {prefix}calls")
        elif answer is not None:
            lines.insert(0, f"start: {prefix}(answer | calls)")
            lines.append(
                f"answer: %json {self._inline(self._check_schema(answer, 'response_format.json_schema.schema'))}"
            )
        else:
            # Free text that does not open a call, then calls or none.
            lines.insert(0, f"start: {prefix}TEXT? calls?")
            lines.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*{_regex_literal(self.tokenizer.tool_call_start)}.*)/")
        return self._lark(lines, "tools")

    # --- helpers -----------------------------------------------------------------
    def _kept_or_built(self, key: str, param: str, build: Callable[[], str]) -> str:
        # (key order stays: it is the order the JSON is written in. A key far over the
        # schema limit is a request that fails its size check, or many tools: not kept.)
        keep = len(key) <= 4 * self.max_bytes
        with self._lock:
            kept = self._kept.get(key) if keep else None
            if kept is not None:
                self._kept.move_to_end(key)
        if kept is None:
            started = time.perf_counter()
            grammar, error = None, None
            try:
                grammar = build()
            except StructuredError as exc:
                error = exc
            kept = (grammar, error, time.perf_counter() - started)
            if keep:
                with self._lock:
                    self._kept[key] = kept
                    while len(self._kept) > GRAMMARS_KEPT:
                        self._kept.popitem(last=False)
        grammar, error, seconds = kept
        if error is None and self.compile_timeout is not None and seconds > self.compile_timeout:
            raise self.too_slow(param, seconds)
        if error is not None:
            raise error
        return grammar

    def too_slow(self, param: str, seconds: float | None = None) -> StructuredError:
        took = f"took {seconds:.1f} s" if seconds is not None else "takes longer"
        return StructuredError(
            f"{param} {took} to compile, more than this server allows ({self.compile_timeout:g} s, setting "
            "schema_compile_timeout); simplify it (fewer alternatives, numeric ranges and patterns)",
            param,
        )

    def _require_tokenizer(self, param: str) -> None:
        if self.lltokenizer is None:
            raise StructuredError(
                f"{param} needs constrained decoding, and {self.unsupported}; send the request "
                "without it, or serve a model with a fast (tokenizer.json) tokenizer",
                param,
            )

    def _call_format(self, why: str):
        tok = self.tokenizer
        parser = getattr(tok, "tool_parser", None)
        family = getattr(parser, "__module__", "").rpartition(".")[2] if parser is not None else None
        if not getattr(tok, "has_tool_calling", False) or family is None:
            raise StructuredError(
                "this model has no tool-call format mlx-lm knows, so a call cannot be forced; "
                "send tool_choice 'auto' or 'none'",
                why,
            )
        if family not in JSON_CALL_FAMILIES:
            raise StructuredError(
                f"forcing a tool call (tool_choice 'required' or a named function, strict tools, "
                f"parallel_tool_calls false) is not supported for this model's tool-call format "
                f"({family!r}; supported: {', '.join(sorted(JSON_CALL_FAMILIES))}); "
                "send tool_choice 'auto' with non-strict tools",
                why,
            )
        before, after, between = JSON_CALL_FAMILIES[family]
        start = Marker.of(tok.tool_call_start, tok.tool_call_start_tokens)
        end = Marker.of(tok.tool_call_end, tok.tool_call_end_tokens)
        return start, end, before, after, between

    def _reasoning(self, param: str) -> tuple[str, str]:
        """The reply starts inside a think block: free reasoning, then the end marker.
        Returns the start rule's prefix and the THINK terminal's definition."""
        tok = self.tokenizer
        end_text = getattr(tok, "think_end", None)
        if not end_text:
            raise StructuredError(
                "the prompt opens a think block but the model names no end marker; "
                'send chat_template_kwargs {"enable_thinking": false}',
                param,
            )
        end = Marker.of(end_text, getattr(tok, "think_end_tokens", None))
        return f"THINK {end.lark}", f"THINK: /(?s:.*)/ & ~/(?s:.*{_regex_literal(end_text)}.*)/"

    def _check_schema(self, schema, param: str) -> dict:
        """``schema`` after checking its size and that llguidance can enforce it on its
        own, so that an error names this field (inside a larger grammar it would not)."""
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise StructuredError(f"{param} must be a JSON Schema object", param)
        self._check_size(schema, param)
        self._validated(LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS), param)
        return schema

    def _check_size(self, schema, param: str) -> None:
        size = len(json.dumps(schema))
        if size > self.max_bytes:
            raise StructuredError(
                f"{param} is {size} bytes of JSON; this server takes at most {self.max_bytes} "
                "(setting max_schema_bytes)",
                param,
            )
        depth = schema_depth(schema)
        if depth > self.max_depth:
            raise StructuredError(
                f"{param} is nested {depth} levels deep; this server takes at most {self.max_depth} "
                "(setting max_schema_depth)",
                param,
            )

    @staticmethod
    def _inline(schema: dict) -> str:
        body = {k: v for k, v in schema.items() if k != "x-guidance"}
        return json.dumps(body | {"x-guidance": JSON_OPTIONS})

    def _lark(self, lines: list[str], param: str) -> str:
        from llguidance import LLMatcher

        return self._validated(LLMatcher.grammar_from_lark("\n".join(lines) + "\n"), param)

    def _validated(self, grammar: str, param: str) -> str:
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if failed:
            raise StructuredError(f"{param} cannot be enforced: {_clean(messages[0])}", param)
        return grammar


def _optional(text: str) -> str:
    return f"{json.dumps(text)}?" if text else ""


def _regex_literal(text: str) -> str:
    """``text`` as a literal inside a /.../ lark regex."""
    out = []
    for ch in text:
        out.append("\\" + ch if ch in ".^$*+?()[]{}|\\/" else ch)
    return "".join(out)


def _clean(message: str) -> str:
    """llguidance's message, on one line and short (it may quote the whole grammar)."""
    text = " ".join(message.split())
    return text if len(text) <= 500 else text[:497] + "..."
