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

from mlx_jaccl_cluster.engine import grammar as grammar_hook
from mlx_jaccl_cluster.engine.grammar import GrammarBatch
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
def loaded(tmp_path_factory):
    return load(str(build_scripted_model(tmp_path_factory.mktemp("m") / "scripted")))


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[1]


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


def test_outcomes_are_kept_and_slow_compiles_refused(tokenizer):
    g = Grammars(tokenizer, None, max_bytes=4096, max_depth=8, compile_timeout=60.0)
    ab = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    ba = ab | {"properties": dict(reversed(ab["properties"].items()))}
    first = g.for_response_format("json_schema", ab, "response_format", reasoning_first=False)
    assert g.for_response_format("json_schema", ab, "response_format", reasoning_first=False) is first  # kept
    # key order is the order the JSON is written in: another grammar
    assert g.for_response_format("json_schema", ba, "response_format", reasoning_first=False) != first
    for _ in range(2):  # the refusal is kept too
        with pytest.raises(StructuredError, match="uniqueItems"):
            g.for_response_format("json_schema", {"type": "array", "uniqueItems": True}, "response_format", False)
    slow = Grammars(tokenizer, None, max_bytes=4096, max_depth=8, compile_timeout=1e-9)
    for _ in range(2):
        with pytest.raises(StructuredError, match="schema_compile_timeout") as err:
            slow.for_tools([WEATHER], "required", True, None, reasoning_first=False)
        assert err.value.param == "tool_choice"


def _allowed(row) -> set[int]:
    return {int(t) for t in np.flatnonzero(np.isfinite(np.array(row)))}


def test_the_batch_mask_allows_only_grammar_tokens(grammars, tokenizer):
    """Rows with a grammar get its mask, a row without one is left alone, logits wider
    than the tokenizer are forbidden in constrained rows; at the end only EOS is left."""
    g = grammars.for_response_format("json_schema", {"enum": ["yes"]}, "response_format", reasoning_first=False)
    g2 = grammars.for_response_format("json_schema", {"type": "integer"}, "response_format", reasoning_first=False)
    eos = sorted(tokenizer.eos_token_ids)
    vocab = grammars.vocab_size + 5  # a model whose logits are wider than the tokenizer
    batch = GrammarBatch(grammars.lltokenizer, grammars.vocab_size, eos, rows=1)  # grows to 3
    batch.add(10, g)
    batch.add(12, g2)

    def expected(grammar, prefix):
        m = feed(grammars, grammar, prefix)
        return {t for t in range(grammars.vocab_size) if m.validate_tokens([t]) == 1}

    prompt = encode(tokenizer, "hi")[-1]
    out = batch.apply([10, 11, 12], mx.array([[prompt]] * 3), mx.zeros((3, 1, vocab)))
    assert out.shape == (3, 1, vocab)
    assert _allowed(out[0, 0]) == expected(g, []) and _allowed(out[0, 0])
    assert _allowed(out[1, 0]) == set(range(vocab))
    assert _allowed(out[2, 0]) == expected(g2, []) != expected(g, [])
    answer = encode(tokenizer, '"yes"')
    digit = encode(tokenizer, "7")
    for k, t in enumerate(answer):
        out = batch.apply([10, 11, 12], mx.array([t, 0, digit[0] if k == 0 else 0]), mx.zeros((3, vocab)))
        if k == 0:
            assert _allowed(out[2]) == expected(g2, digit)
    assert _allowed(out[0]) == set(eos)
    # a token the grammar refused (it cannot happen: it was masked) ends the row with EOS only
    out = batch.apply([10, 11, 12], mx.array([eos[0], 5, 0]), mx.zeros((3, vocab)))
    assert _allowed(out[2]) == set(eos)
    out = batch.apply([10, 11, 12], mx.array([eos[0], 5, 1]), mx.zeros((3, vocab)))
    assert _allowed(out[2]) == set(eos)  # and so it stays
    batch.discard([10, 12])
    plain = mx.zeros((3, vocab))
    assert batch.apply([10, 11, 12], mx.array([1, 2, 3]), plain) is plain  # nothing constrained: untouched
    batch.close()


def test_the_hook_masks_mlx_lm_batches(loaded, grammars, tokenizer):
    """Through mlx-lm's BatchGenerator with the hook installed: the constrained rows of a
    mixed batch write the enum and stop; the unconstrained row writes what it writes alone."""
    from mlx_lm.generate import BatchGenerator

    model, _ = loaded
    g = grammars.for_response_format(
        "json_schema", {"enum": ["yes", "no way"]}, "response_format", reasoning_first=False
    )
    eos = sorted(tokenizer.eos_token_ids)
    batch = GrammarBatch(grammars.lltokenizer, grammars.vocab_size, eos)
    grammar_hook.install(batch)
    try:
        gen = BatchGenerator(model, stop_tokens=[[t] for t in eos])
        prompts = [encode(tokenizer, f"question {i}") for i in range(3)]
        uids = gen.insert(prompts, max_tokens=[30, 12, 30])
        batch.add(uids[0], g)
        batch.add(uids[2], g)
        out: dict[int, list[int]] = {u: [] for u in uids}
        finish = {}
        while len(finish) < 3:
            for r in gen.next()[1]:
                out[r.uid].append(r.token)
                if r.finish_reason:
                    finish[r.uid] = r.finish_reason
                    batch.discard([r.uid])
        gen.close()
    finally:
        grammar_hook.install(None)
    for uid in (uids[0], uids[2]):
        assert finish[uid] == "stop" and out[uid][-1] in eos
        assert json.loads(tokenizer.decode(out[uid][:-1])) in ("yes", "no way")
    assert len(batch) == 0
    alone = BatchGenerator(model, stop_tokens=[[t] for t in eos])
    (uid,) = alone.insert([prompts[1]], max_tokens=[12])
    tokens = []
    while not tokens or r.finish_reason is None:
        for r in alone.next()[1]:
            tokens.append(r.token)
    alone.close()
    assert out[uids[1]] == tokens


LONE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 6, "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["x", "yy"]}, "minItems": 2, "maxItems": 3},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}


def test_a_lone_constrained_sequence_keeps_its_grammar_into_the_batch(loaded, grammars, tokenizer):
    """The single-sequence path masks with the engine's GrammarBatch: alone to the end, or
    handed to the batch mid-JSON with another constrained request joining, the sequence
    gives the tokens the batch alone gives it, and they are the schema's JSON."""
    import jsonschema
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    from mlx_jaccl_cluster.engine.single import Lone, hand_over, take_uid

    model, _ = loaded
    g = grammars.for_response_format("json_schema", LONE_SCHEMA, "response_format", reasoning_first=False)
    g2 = grammars.for_response_format("json_schema", {"enum": ["yes", "no way"]}, "response_format", False)
    eos = sorted(tokenizer.eos_token_ids)
    prompt, other = encode(tokenizer, "question 0"), encode(tokenizer, "question 1")
    masks = GrammarBatch(grammars.lltokenizer, grammars.vocab_size, eos)
    grammar_hook.install(masks)

    def generator():
        return BatchGenerator(model, stop_tokens=[[t] for t in eos], prefill_step_size=4)

    def drain(gen, out):
        while gen._generation_batch.uids or gen._prompt_batch.uids or gen._unprocessed_sequences:
            for r in gen.next()[1]:
                out.setdefault(r.uid, []).append(r.token)
                if r.finish_reason:
                    masks.discard([r.uid])

    try:
        # the batch alone: the reference
        gen = generator()
        uids = gen.insert([prompt, other], max_tokens=[80, 80])
        masks.add(uids[0], g)
        masks.add(uids[1], g2)
        reference: dict[int, list[int]] = {}
        drain(gen, reference)
        gen.close()
        assert reference[0][-1] in eos
        jsonschema.validate(json.loads(tokenizer.decode(reference[0][:-1])), LONE_SCHEMA)
        assert len(reference[0]) > 8

        # alone to the end
        gen = generator()
        uid = take_uid(gen)
        masks.add(uid, g)  # still building while the prompt prefills
        lone = Lone(gen, uid, prompt, make_prompt_cache(model), [], 80, greedy_sampler, [], masks)
        masks._join()
        assert masks._rows[uid].ahead  # the next mask was filled on the mask thread
        alone = [lone.step() for _ in range(len(reference[0]))]
        assert [s.token for s in alone] == reference[0]
        assert alone[-1].finish_reason == "stop"
        masks.discard([uid])
        gen.close()

        # handed over mid-JSON (after 1 and after 5 tokens), a constrained request joining
        for k in (1, 5):
            gen = generator()
            uid = take_uid(gen)
            masks.add(uid, g)
            lone = Lone(gen, uid, prompt, make_prompt_cache(model), [], 80, greedy_sampler, [], masks)
            got = {uid: [lone.step().token for _ in range(k)]}
            hand_over(gen, lone)
            (joined,) = gen.insert([other], max_tokens=[80])
            masks.add(joined, g2)
            drain(gen, got)
            gen.close()
            assert got == reference, f"handed over after {k} tokens"
    finally:
        grammar_hook.install(None)
        masks.close()
    assert len(masks) == 0


def test_a_constrained_request_may_go_alone(tmp_path, monkeypatch):
    """The engine's choice of the single-sequence path no longer looks at the grammar."""
    from mlx_jaccl_cluster.engine.core import Engine
    from mlx_jaccl_cluster.generation import GenerationRequest
    from mlx_jaccl_cluster.settings import Settings
    from mlx_jaccl_cluster.state import ClusterState

    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    settings = Settings(model=tmp_path, world_size=1, rank=0, step_token_budget=16)
    engine = Engine(settings, ClusterState(1, "ring", "m"), None, lambda *a: None)
    engine._lone_ok = True  # what start-up sets for a model whose caches can join a batch
    constrained = GenerationRequest([1, 2, 3], 16, grammar="%json {}")
    assert engine._goes_alone([constrained], [(None, 0)])
    assert not engine._goes_alone([GenerationRequest(list(range(40)), 16, grammar="%json {}")], [(None, 0)])
    assert not engine._goes_alone([constrained, GenerationRequest([4], 16)], [(None, 0), (None, 0)])


def test_masks_filled_ahead_are_the_masks_filled_in_the_step(grammars, tokenizer):
    """ahead() (the mask thread, while the engine thread builds the next forward) feeds
    the same tokens and fills the same masks as apply() does on its own; a row that is
    new, or that the mask thread did not see, is filled in the step; a finished row is
    not fed again (EOS only) and no matcher fails."""
    g = grammars.for_response_format("json_schema", {"enum": ["yes", "no way"]}, "response_format", False)
    eos = sorted(tokenizer.eos_token_ids)
    vocab = grammars.vocab_size
    batch = GrammarBatch(grammars.lltokenizer, vocab, eos, rows=2)
    batch.add(1, g)
    batch.add(2, g)
    prompt = encode(tokenizer, "hi")[-1]
    answer = encode(tokenizer, '"yes"') + [eos[0]]

    def expected(prefix):
        m = feed(grammars, g, prefix)
        return {t for t in range(vocab) if m.validate_tokens([t]) == 1}

    out = batch.apply([1, 2], mx.array([prompt, prompt]), mx.zeros((2, vocab)))
    assert _allowed(out[0]) == _allowed(out[1]) == expected([])  # (the mask may be narrower later:
    # llguidance allows the canonical tokenization of a fixed string, validate_tokens any)
    for k, t in enumerate(answer[:-1]):
        batch.ahead([1], mx.array([t]))  # row 1 ahead, row 2 in the step
        batch._join()
        assert batch._rows[1].ahead and not batch._rows[2].ahead
        # row 1's input is ignored (its token was fed ahead): a wrong one changes nothing
        out = batch.apply([1, 2], mx.array([0, t]), mx.zeros((2, vocab)))
        allowed = _allowed(out[0])
        assert allowed == _allowed(out[1]) and answer[k + 1] in allowed
        assert allowed <= (expected(answer[: k + 1]) | set(eos))
    assert _allowed(out[0]) == set(eos)
    batch.ahead([1, 2], mx.array([eos[0], eos[0]]))  # the grammar ends: stopped
    batch._join()
    batch.ahead([1, 2], mx.array([5, 5]))  # a step past the end: not fed, EOS only
    out = batch.apply([1, 2], mx.array([5, 5]), mx.zeros((2, vocab)))
    assert _allowed(out[0]) == _allowed(out[1]) == set(eos)
    assert batch.failure(1) is None and batch.failure(2) is None
    batch.close()


#: A schema llguidance compiles and validates, but whose parser outgrows its limit (2000
#: items in a row) as soon as the object opens: 600 optional properties, any one may come next.
GIVES_UP = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(600)}}


@pytest.mark.parametrize("ahead", [False, True], ids=["in-step", "ahead"])
def test_a_matcher_that_gives_up_lets_only_eos_and_says_why(tokenizer, ahead):
    grammars = Grammars(tokenizer, None, max_bytes=65536, max_depth=8)
    g = grammars.for_response_format("json_schema", GIVES_UP, "response_format", False)  # accepted
    eos = sorted(tokenizer.eos_token_ids)
    vocab = grammars.vocab_size
    batch = GrammarBatch(grammars.lltokenizer, vocab, eos, rows=1)
    batch.add(7, g)
    prompt = encode(tokenizer, "hi")[-1]
    out = batch.apply([7], mx.array([prompt]), mx.zeros((1, vocab)))
    (brace,) = encode(tokenizer, "{")
    assert brace in _allowed(out[0]) and batch.failure(7) is None
    if ahead:
        batch.ahead([7], mx.array([brace]))
        batch._join()
    out = batch.apply([7], mx.array([brace]), mx.zeros((1, vocab)))
    assert _allowed(out[0]) == set(eos)
    why = batch.failure(7)
    assert "max is 2000" in why and "\n" not in why and len(why) <= 300
    batch.discard([7])
    assert batch.failure(7) is None
    batch.close()
