#!/usr/bin/env python3
"""Memory per request, narrowed down: the RSS of a rank (or of mlx-lm in this process)
while it serves N requests of one kind, 8 at a time, or of several kinds in turn.

    # a running rank 0 (python -m mlx_jaccl_cluster.launch --world 1 ...), its PID:
    benchmarks/request_rss.py --url http://127.0.0.1:8093 --pid PID --kind chat --words 5 60 -n 2400
    benchmarks/request_rss.py --url http://127.0.0.1:8093 --pid PID --kind invalid -n 5000
    # kinds in turn, a minute each; last, each kind's figures at rest before and after it
    benchmarks/request_rss.py --url http://127.0.0.1:8093 --kind chat,chat_turns,stream,completion \
        --max-tokens 64 -n 1000000 --seconds 60
    # the same prompt shapes through mlx-lm's BatchGenerator in this process, no server, 8
    # sequences in flight; --ours adds the engine's pieces one by one (all: every one):
    benchmarks/request_rss.py --inprocess --model MODEL_DIR --words 5 60 -n 2400 [--temperature 1] \
        [--vary-tokens] [--ours fastpath,prefill,budget,samplers,store]
    # the rank's own engine (its thread and loop, world size 1) without HTTP; --without turns
    # pieces off (fastpath, prefill, budget, lone, store):
    benchmarks/request_rss.py --engine --model MODEL_DIR --max-tokens 64 --vary-tokens [--without prefill]
    # plain forward passes (a fresh KV cache each, then --max-tokens decode steps), each of a
    # random batch x length from --tokens, or all of one shape with --fixed (the control):
    benchmarks/request_rss.py --forward --build 'llama:{"hidden_size": 2048, "num_attention_heads": 16,
        "num_key_value_heads": 8}' --tokens 16 512 --max-tokens 4 -n 1500

``--kind`` is one of soak.py's request kinds, each with at most ``--max-tokens`` tokens, greedy
unless ``--temperature``: ``chat`` (here of ``--words`` random words), ``chat_turns`` (multi-turn, so the prompt cache fills and evicts), ``stream``,
``dropped_stream`` (the client leaves mid-stream), ``completion``, and the refused
``invalid``, ``too_long`` and ``too_large``. Comparing kinds and modes narrows a climb down: ``invalid`` tests
the HTTP layer alone, ``--inprocess`` mlx-lm's engine without ours (``--ours``: with the
pieces of ours named), ``--vary-tokens`` answers that end at varied steps (each request's
budget drawn from 1..``--max-tokens``, greedy or not), and ``--forward``
against ``--forward --fixed`` what new shapes alone cost (on CUDA: MLX's per-shape cuDNN
attention graphs). docs/BENCHMARKS.md, "Soak on GPUs", has the figures. Each line also
gives MLX's active and cache memory; against a server (a line every ``--every`` s) also
what RSS holds outside them, and at the end RSS's growth per request over the second half
of the run, with that part's. MLX's figures there come from rank 0's last heartbeat
and swing with the requests in flight, so the outside figure is noisy over a short run, and
against a GPU rank it means nothing (MLX's memory is mostly on the device): read RSS and,
on Linux, what malloc's heaps hold in use (no request in flight: the figures at rest).
The in-process modes set themselves up as a rank does before MLX is imported (its
environment defaults, malloc's settings, MLX's buffer cache limit) and print malloc's heaps
too.

This is a measuring script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from layout_bench import add_model_options, model_from
from soak import CONTEXT_CHARS, KINDS, MAX_BODY
from soak import _text as words_of

CONCURRENT = 8


def _kinds(text: str) -> list[str]:
    kinds = text.split(",")
    if unknown := [k for k in kinds if k not in KINDS]:
        raise argparse.ArgumentTypeError(f"unknown kind {', '.join(unknown)}: one of {', '.join(KINDS)}")
    return kinds


def _sampling(text: str) -> dict:
    try:
        fields = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): give an object, e.g. '{{\"top_k\": 1}}'") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object: give one, e.g. '{{\"top_k\": 1}}'")
    return fields


def rss_mb(pid: int | str = "self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _text(words: tuple[int, int], i: int) -> str:
    return words_of(random, random.randint(*words)) + f" {i}"


async def _rank0_memory(http, pid: int | None) -> dict[str, int]:
    """Rank 0's RSS (from /proc with ``pid``, else its last heartbeat) and MLX's active and
    cache memory, in MB, what RSS holds outside those two, and (glibc) malloc's heaps in use and free."""
    m = next(r for r in (await http.get("/dashboard/state")).json()["ranks"] if r["rank"] == 0)["memory"]
    mb = {k: m[k] >> 20 for k in ("rss", "active", "cache", "malloc_in_use", "malloc_free") if k in m}
    if pid:
        mb["rss"] = rss_mb(pid)
    return mb | {"outside": mb["rss"] - mb["active"] - mb["cache"]}


async def _server(a) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=a.url, timeout=120) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        rows = []
        for kind in a.kind:
            await asyncio.sleep(1.5)  # nothing in flight: the figures of a rank at rest
            before = await _rank0_memory(http, a.pid)
            n = await _run_kind(http, a, kind, model)
            await asyncio.sleep(1.5)
            rows.append((kind, n, before, await _rank0_memory(http, a.pid)))
    if len(rows) > 1 or "malloc_in_use" in rows[0][2]:
        print("\nat rest before -> after each kind (MB):")
        for kind, n, m0, m1 in rows:
            heap = (
                f"; malloc in use {m0['malloc_in_use']} -> {m1['malloc_in_use']}"
                f" ({(m1['malloc_in_use'] - m0['malloc_in_use']) * 1024 / max(n, 1):.1f} KB a request)"
                if "malloc_in_use" in m0
                else ""
            )
            print(f"{kind}: {n} requests, rss {m0['rss']} -> {m1['rss']}{heap}")


async def _run_kind(http, a, kind: str, model: str) -> int:
    """``-n`` requests of ``kind`` (at most ``--seconds``), 8 at a time, with memory lines;
    the number of requests made."""
    from soak import Client, Tally

    start, tally, marks = time.time(), Tally(), []
    deadline = start + (a.seconds or float("inf"))
    sampling = {"temperature": a.temperature} | a.sampling

    async def sample() -> None:
        mem = await _rank0_memory(http, a.pid)
        marks.append((tally.requests, mem["rss"], mem["outside"]))
        print(
            f"{tally.requests} {kind}, {time.time() - start:.0f} s, rss {mem['rss']} MB "
            f"(mlx active {mem['active']}, cache {mem['cache']}, outside {mem['outside']}"
            + (f"; malloc in use {mem['malloc_in_use']}, free {mem['malloc_free']}" if "malloc_free" in mem else "")
            + f"), {len(tally.errors)} errors",
            flush=True,
        )

    started = 0

    async def worker(i: int) -> None:
        nonlocal started
        budget = (1, a.max_tokens) if a.vary_tokens else a.max_tokens
        client = Client(http, model, budget, i, tally, a.max_body, a.context_chars, sampling, a.words)
        while started < a.n and time.time() < deadline:
            started += 1
            await client.one(kind)

    async def sampler() -> None:
        while True:
            await asyncio.sleep(a.every)
            await sample()

    every = asyncio.create_task(sampler())
    await asyncio.gather(*(worker(i) for i in range(CONCURRENT)))
    every.cancel()
    await sample()
    for e in tally.errors[:5]:
        print("error:", e)
    if len(marks) >= 4:  # the second half, past the warm-up
        (n0, r0, m0), (n1, r1, m1) = marks[len(marks) // 2], marks[-1]
        if n1 > n0:
            print(
                f"{kind}, requests {n0}-{n1}: rss {r0} -> {r1} MB, {(r1 - r0) * 1024 / (n1 - n0):.1f} KB a request; "
                f"outside MLX {m0} -> {m1} MB (CPU backend only: on a GPU MLX's memory is not in RSS)"
            )
    return tally.requests


class _Report:
    """A line every tenth of ``n`` and at least every 10 s (a slow run still shows its slope)."""

    def __init__(self, what: str, n: int):
        self.what, self.every, self.start = what, max(1, n // 10), time.time()
        self.last = self.start

    def __call__(self, done: int) -> None:
        import mlx.core as mx

        now = time.time()
        if done % self.every and now - self.last < 10:
            return
        self.last = now
        from mlx_jaccl_cluster.engine.allocator import heap_stats

        mlx = f"mlx active {mx.get_active_memory() >> 20} MB, cache {mx.get_cache_memory() >> 20} MB"
        heap = "".join(f", {k.replace('_', ' ')} {v >> 20} MB" for k, v in heap_stats().items())
        print(f"{done} {self.what}, {now - self.start:.0f} s, rss {rss_mb()} MB, {mlx}{heap}", flush=True)


def _as_a_rank() -> None:
    """Set this process up as main.py sets up a rank, before MLX is imported or a thread
    starts: the rank's environment defaults (MLX's CUDA cache check off, ...) and malloc's
    settings."""
    from mlx_jaccl_cluster.engine.allocator import tune_malloc
    from mlx_jaccl_cluster.main import set_env_defaults
    from mlx_jaccl_cluster.settings import Settings

    set_env_defaults()
    tune_malloc(Settings.default("malloc_arena_max"))


def _load(a):
    import mlx.core as mx
    from mlx_lm import load

    from mlx_jaccl_cluster.settings import Settings

    model, tokenizer = load(str(a.model))
    mx.set_cache_limit(Settings.default("mlx_cache_limit") if a.mlx_cache_limit is None else a.mlx_cache_limit)
    return model, tokenizer


def _forward(a) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = _load(a)
    vocab = model.args.vocab_size
    report = _Report("forwards", a.n)
    for i in range(a.n):
        batch = CONCURRENT if a.fixed else random.randint(1, CONCURRENT)
        length = a.tokens[1] if a.fixed else random.randint(*a.tokens)
        cache = make_prompt_cache(model)
        tokens = model(mx.random.randint(0, vocab, (batch, length)), cache=cache)[:, -1:].argmax(-1)
        for _ in range(a.max_tokens):
            tokens = model(tokens, cache=cache)[:, -1:].argmax(-1)
        mx.eval(tokens)
        report(i + 1)


OURS = ("fastpath", "prefill", "budget", "samplers", "store")


def _ours(text: str) -> set[str]:
    pieces = set(OURS) if text == "all" else set(filter(None, text.split(",")))
    if unknown := pieces - set(OURS):
        raise argparse.ArgumentTypeError(f"unknown piece {', '.join(sorted(unknown))}: all, or of {', '.join(OURS)}")
    return pieces


def _inprocess(a) -> None:
    """mlx-lm's BatchGenerator, 8 sequences in flight, with the engine's pieces in ``a.ours``:
    its patches (engine/fastpath.py, engine/prefill.py), its budgeted generator, its
    per-request samplers, and its prompt cache (a fetch before each insert, a store of each
    finished sequence's cache). Not here, even with all: the engine thread and leader loop
    (core.py), the single-sequence path, logits processors and grammars (a plain chat has
    none), the HTTP side (``--engine`` runs the engine itself)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    from mlx_jaccl_cluster.engine import fastpath, prefill
    from mlx_jaccl_cluster.engine.prompt_cache import PromptCache, kv_bytes_per_token
    from mlx_jaccl_cluster.engine.sampling import make_sampler
    from mlx_jaccl_cluster.generation import SamplingParams
    from mlx_jaccl_cluster.settings import Settings

    model, tokenizer = _load(a)
    if "fastpath" in a.ours:
        fastpath.install()
    if "prefill" in a.ours:
        prefill.install()
    kw = dict(
        max_tokens=a.max_tokens,
        completion_batch_size=CONCURRENT,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        sampler=mlx_lm_sampler(a.temperature),
    )
    if "budget" in a.ours:
        kw |= dict(prefill_step_size=Settings.default("prefill_step_size"), prefill_batch_size=CONCURRENT)
        gen = prefill.Budgeted(model, step_token_budget=Settings.default("step_token_budget"), **kw)
    else:
        gen = BatchGenerator(model, **kw)
    store = None
    if "store" in a.ours:
        config = json.loads((a.model / "config.json").read_text())
        store = PromptCache(
            Settings.default("prompt_cache_size"), Settings.default("prompt_cache_bytes"), kv_bytes_per_token(config)
        )
    started = done = 0
    report = _Report("sequences", a.n)

    def insert(count: int) -> None:  # CONCURRENT in flight, as a server's clients keep it
        nonlocal started
        prompts = [tokenizer.encode(_text(a.words, started + k)) for k in range(count)]
        budgets = [random.randint(1, a.max_tokens) if a.vary_tokens else a.max_tokens for _ in prompts]
        more = {}
        if "samplers" in a.ours:
            more["samplers"] = [
                make_sampler(SamplingParams(temperature=a.temperature, seed=random.getrandbits(32))) for _ in prompts
            ]
        if store is not None:  # as the engine does: the reusable cache, and the rest of the prompt
            reused = [store.fetch(p) for p in prompts]
            more |= dict(caches=[c for c, _ in reused], all_tokens=[p[:k] for p, (_, k) in zip(prompts, reused)])
            prompts = [p[k:] for p, (_, k) in zip(prompts, reused)]
        gen.insert(prompts, max_tokens=budgets, **more)
        started += count

    insert(min(CONCURRENT, a.n))
    while done < a.n:
        ended = [r for r in gen.next()[1] if r.finish_reason is not None]
        if store is not None:
            for r in ended:
                store.store(r.all_tokens, r.prompt_cache)
        finished = len(ended)
        for _ in range(finished):
            done += 1
            report(done)
        if finished and started < a.n:
            insert(min(finished, a.n - started))


#: what --engine --without may turn off in the rank's own engine
ENGINE_PIECES = ("fastpath", "prefill", "budget", "lone", "store")


def _without(text: str) -> set[str]:
    pieces = set(filter(None, text.split(",")))
    if unknown := pieces - set(ENGINE_PIECES):
        raise argparse.ArgumentTypeError(f"unknown piece {', '.join(sorted(unknown))}: of {', '.join(ENGINE_PIECES)}")
    return pieces


def _engine(a) -> None:
    """The rank's own engine (engine/core.py: its thread, its leader loop, every piece),
    world size 1, driven from this thread as rank 0's HTTP side drives it (requests
    submitted, events back through the direct dispatch), 8 in flight; no HTTP, no chat
    template. ``a.without`` turns pieces off: the patches (``fastpath``, ``prefill``), the
    budgeted generator (``budget``: mlx-lm's BatchGenerator instead), the single-sequence
    path (``lone``; with 8 always in flight only the first request takes it), the prompt
    cache (``store``). A request that fails ends the run."""
    import threading

    from mlx_lm.generate import BatchGenerator

    from mlx_jaccl_cluster.engine import fastpath, prefill
    from mlx_jaccl_cluster.engine.core import Engine
    from mlx_jaccl_cluster.generation import EngineUnavailable, ErrorEvent, GenerationRequest, SamplingParams
    from mlx_jaccl_cluster.settings import Settings
    from mlx_jaccl_cluster.state import ClusterState

    if "fastpath" in a.without:
        fastpath.install = lambda: None
    if "prefill" in a.without:
        prefill.install = lambda: None
    if "budget" in a.without:
        prefill.Budgeted = lambda model, *, step_token_budget, **kw: BatchGenerator(model, **kw)
    off = {"single_sequence": False} if "lone" in a.without else {}
    if "store" in a.without:
        off["prompt_cache_size"] = 0
    if a.mlx_cache_limit is not None:
        off["mlx_cache_limit"] = a.mlx_cache_limit
    failed: list[str] = []
    settings = Settings(model=a.model, world_size=1, rank=0, **off)
    engine = Engine(settings, ClusterState(1, settings.backend, a.model.name), None, lambda m, _: failed.append(m))
    engine.start()
    while not engine.state.ready and not failed:
        time.sleep(0.2)
    if failed:
        raise SystemExit(f"the engine did not start: {failed[0]}")
    ended, errors = threading.Semaphore(0), []

    def sink(event) -> None:  # on the engine thread
        if isinstance(event, ErrorEvent):
            errors.append(event.message)
            ended.release()
        elif event.finish_reason is not None:
            ended.release()

    def submit(i: int) -> None:
        budget = random.randint(1, a.max_tokens) if a.vary_tokens else a.max_tokens
        sampling = SamplingParams(temperature=a.temperature, seed=random.getrandbits(32))
        try:
            engine.submit(GenerationRequest(engine.tokenizer.encode(_text(a.words, i)), budget, sampling), sink)
        except EngineUnavailable as exc:
            raise SystemExit(f"the engine failed: {failed[0] if failed else exc}") from None

    report = _Report("sequences", a.n)
    started = min(CONCURRENT, a.n)
    for i in range(started):
        submit(i)
    for done in range(1, a.n + 1):
        while not ended.acquire(timeout=60):
            if failed:
                raise SystemExit(f"the engine failed: {failed[0]}")
            print(f"no sequence ended in 60 s ({done - 1} done)", flush=True)
        if errors:  # a measuring run is void once a request fails
            raise SystemExit(f"a request failed after {done - 1} sequences: {errors[0]}")
        report(done)
        if started < a.n:
            submit(started)
            started += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="rank 0's API")
    p.add_argument("--pid", type=int, help="rank 0's process: its RSS from /proc (default: from its heartbeat)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--inprocess", action="store_true", help="mlx-lm's BatchGenerator in this process instead")
    mode.add_argument("--forward", action="store_true", help="plain forward passes in this process instead")
    mode.add_argument("--engine", action="store_true", help="the rank's own engine in this process instead (no HTTP)")
    p.add_argument(
        "--ours",
        type=_ours,
        default=set(),
        help=f"--inprocess: the engine's pieces to use, comma-separated (all, or of {', '.join(OURS)})",
    )
    p.add_argument(
        "--without",
        type=_without,
        default=set(),
        help=f"--engine: the pieces to turn off, comma-separated (of {', '.join(ENGINE_PIECES)})",
    )
    p.add_argument(
        "--mlx-cache-limit",
        type=int,
        metavar="BYTES",
        help="the in-process modes: MLX's buffer cache limit (default: a rank's); 0 keeps no freed buffer, "
        "so that on CPU malloc's figures hold none",
    )
    p.add_argument("--tokens", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    p.add_argument("--fixed", action="store_true", help=f"--forward: every pass {CONCURRENT} x MAX tokens")
    add_model_options(p)  # --model / --build / --dtype for the in-process modes (--backend: unused)
    p.add_argument(
        "--kind",
        type=_kinds,
        default=["chat"],
        help="soak.py's request kinds (chat: of --words words); several, comma-separated, run one after another",
    )
    p.add_argument("--max-body", type=int, default=MAX_BODY, help="too_large: the server's max_body_bytes")
    p.add_argument(
        "--context-chars", type=int, default=CONTEXT_CHARS, help="too_long: characters surely over the context"
    )
    p.add_argument("--words", type=int, nargs=2, default=(5, 60), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--vary-tokens",
        action="store_true",
        help="each request (sequence) a budget drawn from 1..--max-tokens: greedy answers of varied lengths",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 greedy, else sampled")
    p.add_argument(
        "--sampling", type=_sampling, default={}, help="--url: more sampling fields, as JSON (e.g. '{\"top_k\": 1}')"
    )
    p.add_argument("-n", type=int, default=2400, help="requests (sequences in-process)")
    p.add_argument("--seconds", type=float, help="--url: stop each kind after this long, even short of -n")
    p.add_argument("--every", type=float, default=10, help="--url: seconds between memory lines")
    a = p.parse_args()
    if a.max_tokens < 1:
        p.error(f"--max-tokens must be at least 1, got {a.max_tokens}")
    if a.ours and not a.inprocess:
        p.error("--ours goes with --inprocess")
    if a.without and not a.engine:
        p.error("--without goes with --engine")
    if a.mlx_cache_limit is not None and not (a.inprocess or a.forward or a.engine):
        p.error("--mlx-cache-limit goes with --inprocess, --engine or --forward (a server has its own setting)")
    if a.mlx_cache_limit is not None and a.mlx_cache_limit < 0:
        p.error(f"--mlx-cache-limit must be 0 or more, got {a.mlx_cache_limit}")
    if a.vary_tokens and a.forward:
        p.error("--vary-tokens goes with --url, --inprocess or --engine")
    random.seed(1)
    if a.inprocess or a.forward or a.engine:
        _as_a_rank()
        a.model = model_from(p, a)
        (_forward if a.forward else _engine if a.engine else _inprocess)(a)
    elif a.url:
        asyncio.run(_server(a))
    else:
        p.error("give --url, --inprocess, --engine or --forward")


if __name__ == "__main__":
    main()
