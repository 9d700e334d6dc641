"""A chat reply's channels: the answer, the model's reasoning, and its tool calls.

mlx-lm knows each model family's markers (``<think>``…``</think>``, ``<tool_call>``…) and
ships a text state machine that finds them in decoded text and a parser for the tool-call
format of each family; the engine builds the machine when it loads the tokenizer. This
module drives them for one reply and turns what they find into OpenAI's shapes: content,
``reasoning``, and ``tool_calls`` with JSON-string arguments.

Nothing the model wrote is lost: a tool call that does not parse (cut off by
``max_tokens``, say) and any tool call in a request that offered no tools are returned
as content, markers included. No MLX here.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mjc.api")


@dataclass
class Split:
    """What one piece of text held, by channel."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)


class Channels:
    """Splits one chat reply as it streams. ``tools`` is None when tool calls are not wanted."""

    def __init__(self, machine, tokenizer, tools: list[dict] | None, initial: str = "normal"):
        self._machine = machine
        self._state = machine.make_state(initial)
        self._tokenizer = tokenizer
        self._tools = tools
        self._tool_text: str | None = None  # inside a tool call: what it said so far
        self.calls_made = 0

    def feed(self, text: str, final: bool) -> Split:
        """Text the reply added (after stop strings); ``final`` on its last piece."""
        out = Split()
        self._state, segments = self._machine.split(self._state, text)
        if final:
            self._state, rest, state = self._machine.flush(self._state)
            segments.append((state, rest))
        for state, chunk in segments:
            if state == "tool":
                self._tool_text = (self._tool_text or "") + chunk
                continue
            if self._tool_text is not None:
                self._end_tool_call(out, closed=True)
            if state == "reasoning":
                out.reasoning += chunk
            else:  # "normal", or None once the machine reached an end state
                out.content += chunk
        if final and self._tool_text is not None:
            self._end_tool_call(out, closed=False)
        return out

    def _end_tool_call(self, out: Split, closed: bool) -> None:
        text, self._tool_text = self._tool_text or "", None
        calls = self._parse(text) if self._tools is not None else None
        if calls is None:
            end = (self._tokenizer.tool_call_end or "") if closed else ""
            out.content += f"{self._tokenizer.tool_call_start}{text}{end}"
            return
        for call in calls:
            out.tool_calls.append(self._openai_call(call))

    def _parse(self, text: str) -> list[dict] | None:
        try:
            parsed = self._tokenizer.tool_parser(text, self._tools)
        except Exception as exc:  # each family's parser raises its own errors
            log.warning("a tool call did not parse (%s: %s); returned as text", type(exc).__name__, exc)
            return None
        calls = parsed if isinstance(parsed, list) else [parsed]
        if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            log.warning("a tool call parsed to %r, not a named call; returned as text", parsed)
            return None
        return calls

    def _openai_call(self, call: dict[str, Any]) -> dict:
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        index = self.calls_made
        self.calls_made += 1
        return {
            "index": index,
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": arguments},
        }


def initial_state(tokenizer, prompt: list[int]) -> str:
    """Whether the reply starts inside reasoning (the prompt opened a think block)."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state
