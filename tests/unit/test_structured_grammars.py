"""The grammars behind response_format and forced tool calls, on a real tokenizer (the
scripted model's: json_tools call format, thinking markers), and the engine's mask.
No ranks: the matcher is fed token ids directly."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from llguidance import LLMatcher
from mlx_lm import load

from mlx_jaccl_cluster.engine.sampling import GrammarMask
from mlx_jaccl_cluster.models.scripted import build_scripted_model
from mlx_jaccl_cluster.structured import Grammars, StructuredError, schema_depth

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC"]}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    _, tok = load(str(build_scripted_model(tmp_path_factory.mktemp("m") / "scripted")))
    return tok


@pytest.fixture(scope="module")
def grammars(tokenizer):
    g = Grammars(tokenizer, None, max_bytes=4096, max_depth=8)
    assert g.unsupported is None
    return g


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def call_tokens(tokenizer, payload: dict) -> list[int]:
    start, end = tokenizer.tool_call_start_tokens[0], tokenizer.tool_call_end_tokens[0]
    return [start] + encode(tokenizer, "\n" + json.dumps(payload) + "\n") + [end]


def feed(grammars, grammar: str, tokens: list[int]) -> LLMatcher:
    m = LLMatcher(grammars.lltokenizer, grammar)
    for t in tokens:
        if not m.consume_token(t):
            break
    return m


def test_schema_depth():
    assert schema_depth(1) == 0 and schema_depth({}) == 1
    assert schema_depth({"a": [{"b": 1}]}) == 3


def test_required_call_accepts_a_valid_call_then_only_eos(grammars, tokenizer):
    g = grammars.for_tools([WEATHER, TIME], "required", parallel=False, answer=None, reasoning_first=False)
    m = feed(grammars, g, call_tokens(tokenizer, {"name": "get_weather", "arguments": {"city": "Paris"}}))
    assert not m.is_error() and m.is_accepting() and m.is_stopped()
    bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
    assert set(np.flatnonzero(bits)) == set(tokenizer.eos_token_ids)


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "get_wether", "arguments": {"city": "Paris"}},  # not a declared tool
        {"name": "get_weather", "arguments": {"town": "Paris"}},  # arguments off its schema
        {"name": "get_time", "arguments": {"zone": "CET"}},  # named choice is get_weather
    ],
)
def test_named_call_refuses_anything_else(grammars, tokenizer, payload):
    g = grammars.for_tools([WEATHER, TIME], {"name": "get_weather"}, parallel=False, answer=None, reasoning_first=False)
    assert feed(grammars, g, call_tokens(tokenizer, payload)).is_error()


def test_required_refuses_text_first(grammars, tokenizer):
    g = grammars.for_tools([WEATHER], "required", parallel=False, answer=None, reasoning_first=False)
    assert feed(grammars, g, encode(tokenizer, "Sure")).is_error()


def test_parallel_false_allows_one_call_only(grammars, tokenizer):
    one = call_tokens(tokenizer, {"name": "get_weather", "arguments": {"city": "Oslo"}})
    for parallel, ok in ((True, True), (False, False)):
        g = grammars.for_tools([WEATHER], "required", parallel=parallel, answer=None, reasoning_first=False)
        assert feed(grammars, g, one + encode(tokenizer, "\n") + one).is_error() is not ok


def test_auto_allows_text_then_a_strict_call(grammars, tokenizer):
    strict = {"type": "function", "function": WEATHER["function"] | {"strict": True}}
    g = grammars.for_tools([strict], "auto", parallel=True, answer=None, reasoning_first=False)
    text = encode(tokenizer, "Let me check. ")
    good = feed(grammars, g, text + call_tokens(tokenizer, {"name": "get_weather", "arguments": {"city": "Rome"}}))
    assert not good.is_error() and good.is_accepting()
    assert feed(grammars, g, text).is_accepting()  # no call at all is fine under auto
    bad = feed(grammars, g, text + call_tokens(tokenizer, {"name": "get_weather", "arguments": {}}))
    assert bad.is_error()


def test_auto_with_answer_schema_is_json_or_a_call(grammars, tokenizer):
    answer = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    g = grammars.for_tools([WEATHER], "auto", parallel=False, answer=answer, reasoning_first=False)
    assert feed(grammars, g, encode(tokenizer, '{"ok": true}')).is_stopped()
    assert feed(grammars, g, encode(tokenizer, "Hello")).is_error()


def test_reasoning_first_then_json(grammars, tokenizer):
    g = grammars.for_response_format("json_object", None, "response_format", reasoning_first=True)
    end = tokenizer.think_end_tokens[0] if len(tokenizer.think_end_tokens) == 1 else None
    tokens = encode(tokenizer, "thinking about it") + ([end] if end is not None else encode(tokenizer, "</think>"))
    m = feed(grammars, g, tokens + encode(tokenizer, "{}"))
    assert not m.is_error() and m.is_accepting()


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "array", "uniqueItems": True}, ["uniqueItems"]),
        ({"type": "integer", "x": [[[[[[[[[1]]]]]]]]]}, ["nested", "max_schema_depth"]),
        ({"type": "string", "description": "y" * 5000}, ["bytes", "max_schema_bytes"]),
        ([1], ["JSON Schema object"]),
    ],
)
def test_bad_schemas_name_the_field(grammars, schema, words):
    with pytest.raises(StructuredError) as err:
        grammars.for_response_format("json_schema", schema, "response_format", reasoning_first=False)
    assert err.value.param == "response_format.json_schema.schema"
    for word in words:
        assert word in err.value.message


def test_bad_tool_parameters_name_the_tool(grammars):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(StructuredError) as err:
        grammars.for_tools([WEATHER, bad], "required", parallel=False, answer=None, reasoning_first=False)
    assert err.value.param == "tools[1].function.parameters" and "not" in err.value.message


def test_unknown_call_format_and_no_tokenizer_are_refused(tokenizer):
    class NoTools:
        has_tool_calling = False
        eos_token_ids = tokenizer.eos_token_ids
        _tokenizer = tokenizer._tokenizer

    g = Grammars(NoTools(), None, 4096, 8)
    with pytest.raises(StructuredError, match="no tool-call format"):
        g.for_tools([WEATHER], "required", parallel=False, answer=None, reasoning_first=False)
    broken = Grammars(object(), None, 4096, 8)
    assert broken.unsupported and "llguidance cannot use" in broken.unsupported
    with pytest.raises(StructuredError, match="llguidance cannot use") as err:
        broken.for_response_format("json_object", None, "response_format", reasoning_first=False)
    assert err.value.param == "response_format"


def test_the_mask_allows_only_grammar_tokens(grammars, tokenizer):
    g = grammars.for_response_format("json_schema", {"enum": ["yes"]}, "response_format", reasoning_first=False)
    vocab = grammars.vocab_size + 5  # a model whose logits are wider than the tokenizer
    mask = GrammarMask(grammars.lltokenizer, g, grammars.vocab_size, sorted(tokenizer.eos_token_ids))
    prompt = mx.array(encode(tokenizer, "hi"))
    out = mask(prompt, mx.zeros((1, vocab)))
    allowed = set(np.flatnonzero(np.isfinite(np.array(out[0]))))
    expected = {t for t in range(grammars.vocab_size) if LLMatcher(grammars.lltokenizer, g).validate_tokens([t]) == 1}
    assert allowed == expected and allowed
    # after the whole answer, only EOS
    for t in encode(tokenizer, '"yes"'):
        out = mask(mx.concatenate([prompt, mx.array([t])]), mx.zeros((1, vocab)))
        prompt = mx.concatenate([prompt, mx.array([t])])
    assert set(np.flatnonzero(np.isfinite(np.array(out[0])))) == set(tokenizer.eos_token_ids)
