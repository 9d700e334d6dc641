"""The single-sequence path (engine/single.py) and the batch step without logprobs
(engine/fastpath.py) give the tokens mlx-lm gives: in-process first, then on real ranks
with requests joining a lone one (its cache moves into the batch) and leaving."""

import json
import threading
import time

import httpx
import pytest
from conftest import reference_text

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
OTHERS = ["Once upon a time", "In the beginning the", "My favourite colour"]


def _reference_tokens(model, prompt: str, max_tokens: int):
    from mlx_lm import load, stream_generate

    model_obj, tokenizer = load(str(model))
    tokens = tokenizer.encode(prompt)
    out = list(stream_generate(model_obj, tokenizer, tokens, max_tokens=max_tokens))
    return model_obj, tokenizer, tokens, out


def test_lone_sequence_and_its_hand_over_match_mlx_lm(tiny_llama):
    """In-process, no ranks: a lone sequence gives stream_generate's tokens and logprobs,
    and handed to the batch after 1, 4 or 9 tokens it goes on with the batch's tokens,
    as does the request that joined it."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

    from mlx_jaccl_cluster.engine import fastpath
    from mlx_jaccl_cluster.engine.single import Lone, hand_over, take_uid

    n = 24
    model, tokenizer, prompt, ref = _reference_tokens(tiny_llama, PROMPT, n)
    other = tokenizer.encode(OTHERS[0])
    fastpath.install()

    def generator():
        stops = [[t] for t in sorted(tokenizer.eos_token_ids)]
        return BatchGenerator(model, stop_tokens=stops, completion_batch_size=8, prefill_step_size=4)

    def run_lone(gen, sampler=greedy_sampler, processors=(), max_tokens=n):
        lone = Lone(gen, take_uid(gen), prompt, make_prompt_cache(model), [], max_tokens, sampler, list(processors))
        return lone

    # alone to the end, logprobs asked: tokens and log-probabilities of stream_generate
    gen = generator()
    lone = run_lone(gen, fastpath.WithLogprobs(greedy_sampler))
    steps = [lone.step() for _ in range(n)]
    assert [s.token for s in steps] == [r.token for r in ref]
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])
    for s, r in zip(steps, ref):
        assert mx.allclose(s.logprobs, r.logprobs, atol=1e-4).item()
    assert steps[-1].all_tokens == prompt + [r.token for r in ref]
    assert steps[-1].prompt_cache[0].offset == len(prompt) + n
    # not asked: no logprobs computed
    assert run_lone(generator()).step().logprobs is None

    # the batch alone (what the engine did before), for the joined request's tokens
    gen = generator()
    gen.insert([prompt, other], max_tokens=[n, n])
    batch = {0: [], 1: []}
    while len(batch[0]) < n or len(batch[1]) < n:
        for r in gen.next()[1]:
            batch[r.uid].append(r.token)
    assert batch[0] == [r.token for r in ref]

    for k in (1, 4, 9):
        gen = generator()
        lone = run_lone(gen)
        got = {0: [lone.step().token for _ in range(k)], 1: []}
        hand_over(gen, lone)
        assert gen.insert([other], max_tokens=[n]) == [1]
        while len(got[0]) < n or len(got[1]) < n:
            for r in gen.next()[1]:
                got[r.uid].append(r.token)
        assert got == batch, f"handed over after {k} tokens"

    # a logits processor (repetition penalty) sees the same context on both paths
    processors = make_logits_processors(repetition_penalty=1.5)
    gen = generator()
    gen.insert([prompt], max_tokens=[n], logits_processors=[processors])
    plain = []
    while len(plain) < n:
        plain += [r.token for r in gen.next()[1]]
    gen = generator()
    lone = run_lone(gen, processors=processors)
    mixed = [lone.step().token for _ in range(5)]
    hand_over(gen, lone)
    while len(mixed) < n:
        mixed += [r.token for r in gen.next()[1]]
    assert mixed == plain


def _stream(cluster, prompt: str, max_tokens: int, events: list, stop_after: int | None = None, **extra):
    """Stream a completion, recording (time, chunk); close after ``stop_after`` chunks."""
    body = {"model": cluster.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", cluster.url("/v1/completions"), json=body | extra, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append((time.monotonic(), json.loads(line[6:])))
            if stop_after is not None and len(events) >= stop_after:
                return


def _text(events) -> str:
    return "".join(c["choices"][0].get("text", "") for _, c in events if c.get("choices"))


@pytest.mark.parametrize(
    "arch,world,parallel",
    [("llama", 1, "tensor"), ("llama", 2, "tensor"), ("qwen2", 2, "pipeline")],
    ids=["1rank", "2rank-tensor", "2rank-pipeline"],
)
def test_requests_join_and_leave_a_lone_one_on_real_ranks(arch, world, parallel, request, cluster_factory):
    model = request.getfixturevalue(f"tiny_{arch}")
    cluster = cluster_factory(model, world, parallel=parallel)
    cluster.wait_ready()
    long_n, short_n = 160, 12
    expected_long = reference_text(model, prompt=PROMPT, max_tokens=long_n)
    expected = {p: reference_text(model, prompt=p, max_tokens=short_n) for p in OTHERS}

    # a request alone (the single-sequence path), then others join it while it decodes
    # (it moves into the batch), one of them leaving early (its client closes the stream)
    long_events: list = []
    runner = threading.Thread(target=_stream, args=(cluster, PROMPT, long_n, long_events))
    runner.start()
    deadline = time.monotonic() + 120
    while len(long_events) < 4:
        assert time.monotonic() < deadline and runner.is_alive(), "the long request gave no tokens"
        time.sleep(0.005)
    joined_at = time.monotonic()
    leaving: list = []
    leaver = threading.Thread(target=_stream, args=(cluster, OTHERS[2], 64, leaving), kwargs={"stop_after": 2})
    leaver.start()
    answers = {}
    for p in OTHERS[:2]:
        r = httpx.post(
            cluster.url("/v1/completions"),
            json={"model": cluster.model_id, "prompt": p, "max_tokens": short_n, "temperature": 0},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        answers[p] = r.json()["choices"][0]["text"]
    leaver.join(120)
    runner.join(120)
    assert not runner.is_alive() and not leaver.is_alive()
    assert long_events[-1][0] > joined_at, "the others must have joined while the long request decoded"
    assert _text(long_events) == expected_long
    assert answers == {p: expected[p] for p in OTHERS[:2]}
    assert len(leaving) == 2

    # alone again afterwards, with logprobs asked: the chosen token's logprob is mlx-lm's
    _, tokenizer, _, ref = _reference_tokens(model, PROMPT, 8)
    r = httpx.post(
        cluster.url("/v1/completions"),
        json={"model": cluster.model_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == reference_text(model, prompt=PROMPT, max_tokens=8)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([x.logprobs[x.token].item() for x in ref], abs=1e-4)
    # and in a batch: two at once, each with its logprobs
    results: dict = {}

    def ask(p):
        results[p] = httpx.post(
            cluster.url("/v1/completions"),
            json={"model": cluster.model_id, "prompt": p, "max_tokens": 8, "temperature": 0, "logprobs": 1},
            timeout=120,
        ).json()

    threads = [threading.Thread(target=ask, args=(p,)) for p in (PROMPT, OTHERS[0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    got = results[PROMPT]["choices"][0]["logprobs"]["token_logprobs"]
    assert got == pytest.approx([x.logprobs[x.token].item() for x in ref], abs=1e-4)
    assert results[OTHERS[0]]["choices"][0]["text"] == reference_text(model, prompt=OTHERS[0], max_tokens=8)

    # a lone request whose client leaves, then the next one alone: still mlx-lm's tokens
    left: list = []
    _stream(cluster, OTHERS[1], 400, left, stop_after=2)
    assert len(left) == 2
    again: list = []
    _stream(cluster, PROMPT, long_n, again)
    assert _text(again) == expected_long
