"""Prefill chunks queued with the decode step and the host copy of the batch cache's left
padding (engine/prefill.py): mlx-lm's batch engine, so patched, still gives every
sequence the tokens in-process ``stream_generate`` gives it, with prompts of different
lengths prefilled over many steps while others decode, joining, finishing and removed."""

import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a dragon who lived in a cave high above the village, and every "
    "morning it flew down to the river to drink",
    "In the beginning",
    "My favourite colour is blue because the sky and the sea are blue and I like both of them very much",
]


def test_batch_engine_with_queued_prefill_matches_mlx_lm(tiny_llama):
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import BatchKVCache

    from mlx_jaccl_cluster.engine import fastpath, prefill

    model, tokenizer = load(str(tiny_llama))
    n = 20
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts) and max(len(p) for p in prompts) > 3 * 5
    ref = [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=n)] for p in prompts]
    fastpath.install()
    prefill.install()

    stops = [[t] for t in sorted(tokenizer.eos_token_ids)]
    gen = BatchGenerator(model, stop_tokens=stops, completion_batch_size=8, prefill_step_size=5)
    got: dict[int, list[int]] = {}
    # one decodes alone, then two arrive together (different lengths: right padding rolled
    # to the left), then a long one while three decode; one request is removed early
    gen.insert([prompts[0]], max_tokens=[n])
    schedule = {3: [1, 2], 9: [3]}
    removed = None
    step = 0
    while step < 400:
        if step in schedule:
            gen.insert([prompts[i] for i in schedule[step]], max_tokens=[n] * len(schedule[step]))
        if step == 14:
            removed = 2
            gen.remove([removed])
        _, responses = gen.next()
        for r in responses:
            got.setdefault(r.uid, []).append(r.token)
            if r.finish_reason is not None:
                assert r.prompt_cache[0].offset == len(r.all_tokens)
        step += 1
        if all(len(got.get(u, ())) >= n for u in (0, 1, 3)) and not gen._generation_batch.uids:
            break
    for uid in (0, 1, 3):
        assert got[uid] == ref[uid], f"sequence {uid}"
    assert got[removed] == ref[removed][: len(got[removed])] and len(got[removed]) < n

    # the host copy follows the array through prepare, finalize, extend, filter
    a = BatchKVCache([0, 2])
    k = mx.zeros((2, 1, 3, 4))
    a.prepare(lengths=[3, 1], right_padding=[0, 2])
    a.update_and_fetch(k, k)
    a.finalize()
    b = BatchKVCache.merge([_kv(5), _kv(2)])
    a.extend(b)
    assert a._host_left_padding == a.left_padding.tolist()
    a.filter([1, 3])
    assert a._host_left_padding == a.left_padding.tolist()
    assert a.extract(1).offset == 2


def _kv(length):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    c = KVCache()
    c.update_and_fetch(mx.ones((1, 1, length, 4)), mx.ones((1, 1, length, 4)))
    return c


def test_the_step_token_budget_keeps_decoders_going_and_tokens_unchanged(tiny_llama):
    """prefill.Budgeted: while long prompts prefill, every step still decodes every running
    sequence, runs at most the budget (decode rows + waiting prompts x their chunk), and
    two waiting prompts share it; each sequence's tokens are those of the unchunked path
    (mlx-lm's generator prefilling each prompt in one piece) and of stream_generate.
    Counted in steps, not time."""
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator

    from mlx_jaccl_cluster.engine import fastpath, prefill

    model, tokenizer = load(str(tiny_llama))
    fastpath.install()
    prefill.install()
    n, budget = 48, 24
    decoders = [tokenizer.encode(p) for p in (PROMPTS[0], PROMPTS[2])]
    long_prompt = tokenizer.encode(" ".join(PROMPTS[1:] * 4))
    medium = tokenizer.encode(PROMPTS[3])
    assert len(long_prompt) > 6 * budget and len(medium) > budget
    prompts = decoders + [long_prompt, medium]
    ref = [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=n)] for p in prompts]
    stops = [[t] for t in sorted(tokenizer.eos_token_ids)]

    def run(gen):
        """Two decoders from step 0; the long and the medium prompt arrive together at step 3."""
        got: dict[int, list[int]] = {}
        steps = []
        gen.insert(decoders, max_tokens=[n, n])
        for step in range(1000):
            if step == 3:
                gen.insert([long_prompt, medium], max_tokens=[n, n])
            _, responses = gen.next()
            for r in responses:
                got.setdefault(r.uid, []).append(r.token)
            steps.append(({r.uid for r in responses}, getattr(gen, "last_step", None)))
            if step > 3 and not (gen._generation_batch.uids or gen._prompt_batch.uids or gen._unprocessed_sequences):
                break
        return got, steps

    whole, _ = run(BatchGenerator(model, stop_tokens=stops, completion_batch_size=8, prefill_step_size=4096))
    gen = prefill.Budgeted(
        model, step_token_budget=budget, stop_tokens=stops, completion_batch_size=8, prefill_step_size=16
    )
    got, steps = run(gen)
    assert got == whole == {uid: ref[uid] for uid in range(4)}

    first_token = {uid: next(i for i, (uids, _) in enumerate(steps) if uid in uids) for uid in (2, 3)}
    # the long prompt took many steps, and every one of them decoded both decoders
    prefilling = range(3, first_token[2])
    assert len(prefilling) >= len(long_prompt) // budget
    for i in prefilling:
        uids, (rows, chunks) = steps[i]
        assert {0, 1} <= uids, f"step {i}: a decoder got no token while the long prompt prefilled"
        assert rows + len(chunks) * max(chunks, default=0) <= budget, f"step {i} ran {rows} rows + chunks {chunks}"
    # while both waited, they shared the budget
    shared = [steps[i][1] for i in range(3, first_token[3]) if len(steps[i][1][1]) == 2]
    assert shared and all(max(chunks) <= (budget - rows) // 2 for rows, chunks in shared)
    # a full decode batch leaves each waiting prompt a token a step: it never starves
    assert gen.prefill_share(budget + 5, 3) == 1 and gen.prefill_share(4, 2) == (budget - 4) // 2
