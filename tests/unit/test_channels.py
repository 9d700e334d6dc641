"""Splitting a streamed chat reply into content, reasoning and tool calls (api/channels.py),
with the scripted model's real tokenizer and mlx-lm's own marker machine and parser."""

from __future__ import annotations

import json

import pytest
from mlx_lm.generate import make_text_state_machine
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_jaccl_cluster.api.channels import Channels, initial_state
from mlx_jaccl_cluster.models.scripted import build_scripted_model

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
REPLY = (
    '<think>plan</think>Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    'Done.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_scripted_model(tmp_path_factory.mktemp("m") / "scripted"))


def _run(tokenizer, pieces: list[str], tools=TOOLS):
    channels = Channels(make_text_state_machine(tokenizer), tokenizer, tools)
    content, reasoning, calls = "", "", []
    for i, piece in enumerate(pieces):
        out = channels.feed(piece, final=i == len(pieces) - 1)
        content, reasoning, calls = content + out.content, reasoning + out.reasoning, calls + out.tool_calls
    return content, reasoning, calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(REPLY)])
def test_markers_split_across_pieces_are_still_found(tokenizer, size):
    pieces = [REPLY[i : i + size] for i in range(0, len(REPLY), size)]
    content, reasoning, calls = _run(tokenizer, pieces)
    assert (content, reasoning) == ("Sure.Done.", "plan")
    assert [c["index"] for c in calls] == [0, 1]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Oslo", "Rome"]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


def test_no_marker_text_is_held_back_at_the_end(tokenizer):
    assert _run(tokenizer, ["a <thi"]) == ("a <thi", "", [])
    assert _run(tokenizer, ["x", "<tool_"]) == ("x<tool_", "", [])


def test_calls_are_text_when_no_tools_were_offered(tokenizer):
    content, _, calls = _run(tokenizer, [REPLY], tools=None)
    assert calls == []
    assert content == "Sure." + REPLY.split("Sure.")[1]


def test_an_unparsable_call_is_text(tokenizer):
    content, _, calls = _run(tokenizer, ["<tool_call>not json</tool_call>ok"])
    assert calls == [] and content == "<tool_call>not json</tool_call>ok"


def test_a_prompt_that_opens_a_think_block_starts_in_reasoning(tokenizer):
    opened = tokenizer.encode("<|im_start|>assistant\n<think>")
    closed = tokenizer.encode("<think>x</think>")
    assert initial_state(tokenizer, opened) == "reasoning"
    assert initial_state(tokenizer, closed) == "normal"
    channels = Channels(make_text_state_machine(tokenizer), tokenizer, TOOLS, initial="reasoning")
    out = channels.feed("thinking</think>answer", final=True)
    assert (out.reasoning, out.content) == ("thinking", "answer")
