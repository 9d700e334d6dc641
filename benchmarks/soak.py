#!/usr/bin/env python3
"""Soak a running cluster: N requests over M minutes from a few concurrent clients, then
errors, latency percentiles, the slowest requests (and when each started) and each rank's
RSS growth after warm-up.

    benchmarks/soak.py http://127.0.0.1:8080 --key KEY --clients 6 --minutes 10 [--out soak.json]

Each client loops over a mix that looks like real use plus the abuse the server must
shrug off: chats (multi-turn, so the prompt cache fills and evicts), streaming chats,
text completions, a stream the client drops half-way (a cancellation), an invalid
request and an over-long prompt (both must be refused with 400), and every so often a
body over the size cap (413). An *error* is any answer other than the one expected.

Memory comes from ``/dashboard/state`` (every rank's RSS from its heartbeats), sampled
every ``--sample`` s; growth is measured from the end of the warm-up (``--warmup`` s) to
the end, so allocator and cache warm-up do not count, as the median of the first
``--window`` s after the warm-up against the median of the last ``--window`` s (a single
sample swings with the KV caches of the requests in flight). The run passes (exit 0) with no
errors and RSS growth under ``--max-growth`` % on every rank.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

from mlx_jaccl_cluster.settings import Settings

MAX_BODY = Settings.default("max_body_bytes")  # the server's, unless it was set
CONTEXT_CHARS = 50_000  # over the context of any model the soak is meant for (too_long)
KINDS = ("chat", "chat_turns", "stream", "completion", "dropped_stream", "invalid", "too_long", "too_large")
WEIGHTS = (30, 15, 20, 15, 5, 6, 6, 3)
WORDS = (
    "cluster ring token model cache layer batch prompt stream queue rank heartbeat memory link "
    "apple silicon thunderbolt tensor pipeline shard"
).split()


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: list[str] = field(default_factory=list)
    rss: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    mlx: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)  # (t, active, cache) per rank
    # (t, in use, free) per rank: what glibc's heaps hold (Linux ranks only)
    heap: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)
    requests: int = 0
    # (seconds, kind, seconds into the run when it started) of every answered request
    timed: list[tuple[float, str, float]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


class Client:
    def __init__(
        self,
        http: httpx.AsyncClient,
        model: str,
        max_tokens: int | tuple[int, int],
        seed: int,
        tally: Tally,
        max_body: int,
        context_chars: int,
        sampling: dict | None = None,
        chat_words: tuple[int, int] = (20, 20),
    ):
        self.http, self.model, self.max_tokens, self.tally = http, model, max_tokens, tally
        self.rng = random.Random(seed)
        self.max_body, self.context_chars = max_body, context_chars
        self.sampling = sampling or {}  # e.g. {"temperature": 0}; the server's defaults otherwise
        self.chat_words = chat_words  # a chat's prompt: this many random words (lowest, highest)
        # max_tokens: each request's answer budget, or (lowest, highest) to draw one a request
        self.turns: list[dict] = []

    def _budget(self) -> int:
        if isinstance(self.max_tokens, int):
            return self.max_tokens
        return self.rng.randint(*self.max_tokens)

    def _chat(self, messages: list[dict], **kw) -> dict:
        return {"model": self.model, "messages": messages, "max_tokens": self._budget(), **self.sampling, **kw}

    async def one(self, kind: str) -> None:
        started = time.perf_counter()
        try:
            problem = await getattr(self, kind)()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self.tally.requests += 1
        if problem:
            self.tally.errors.append(f"{kind}: {problem}")
        else:
            took = time.perf_counter() - started
            self.tally.latencies[kind].append(took)
            self.tally.timed.append((took, kind, started - self.tally.start))

    async def _expect(self, path: str, body, status: int, **kw) -> str | None:
        r = (
            await self.http.post(path, json=body, **kw)
            if not isinstance(body, bytes)
            else await self.http.post(path, content=body, headers={"Content-Type": "application/json"})
        )
        if r.status_code != status:
            return f"{path} answered {r.status_code}, expected {status}: {r.text[:200]}"
        if status != 200 and set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
            return f"{path} error not in the API's shape: {r.text[:200]}"
        return None

    async def chat(self) -> str | None:
        lo, hi = self.chat_words
        words = lo if lo == hi else self.rng.randint(lo, hi)
        return await self._expect(
            "/v1/chat/completions", self._chat([{"role": "user", "content": _text(self.rng, words)}]), 200
        )

    async def chat_turns(self) -> str | None:
        if len(self.turns) > 12 or not self.turns:
            self.turns = [{"role": "system", "content": "You answer briefly. " + _text(self.rng, 60)}]
        self.turns.append({"role": "user", "content": _text(self.rng, 15)})
        r = await self.http.post("/v1/chat/completions", json=self._chat(self.turns))
        if r.status_code != 200:
            self.turns = []
            return f"chat turn answered {r.status_code}: {r.text[:200]}"
        self.turns.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or ""})
        return None

    async def stream(self, drop: bool = False) -> str | None:
        body = self._chat([{"role": "user", "content": _text(self.rng, 20)}], stream=True)
        if drop:
            body["max_tokens"] = max(body["max_tokens"], 64)
        done = False
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"stream answered {r.status_code}"
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if '"error"' in line:
                        return f"stream error event: {line[:200]}"
                    done = line == "data: [DONE]"
                    if drop and chunks >= 3:
                        return None  # leave mid-stream: the server must count a cancellation
        return None if done else "stream ended without [DONE]"

    async def dropped_stream(self) -> str | None:
        return await self.stream(drop=True)

    async def completion(self) -> str | None:
        return await self._expect(
            "/v1/completions",
            {"model": self.model, "prompt": _text(self.rng, 20), "max_tokens": self._budget(), **self.sampling},
            200,
        )

    async def invalid(self) -> str | None:
        bad = self.rng.choice(
            [
                {"temperature": "hot"},
                {"n": 2},
                {"messages": []},
                {"max_tokens": 0},
                {"logit_bias": {"x": 1}},
                {"stop": [""]},
            ]
        )
        return await self._expect("/v1/chat/completions", self._chat([{"role": "user", "content": "hi"}]) | bad, 400)

    async def too_long(self) -> str | None:
        # over the context: refused (before tokenizing when it is far over)
        size = self.rng.choice([self.context_chars * 2, min(self.max_body // 2, 2_000_000)])
        return await self._expect(
            "/v1/chat/completions", self._chat([{"role": "user", "content": "x " * (size // 2)}]), 400
        )

    async def too_large(self) -> str | None:
        return await self._expect("/v1/chat/completions", b"{" + b" " * (self.max_body + 1024) + b"}", 413)


async def sample_memory(http: httpx.AsyncClient, tally: Tally, start: float, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            state = (await http.get("/dashboard/state")).json()
            for r in state["ranks"]:
                if "rss" in r.get("memory", {}):
                    tally.rss.setdefault(r["rank"], []).append((time.monotonic() - start, r["memory"]["rss"]))
                    tally.mlx.setdefault(r["rank"], []).append(
                        (time.monotonic() - start, r["memory"].get("active", 0), r["memory"].get("cache", 0))
                    )
                if "malloc_in_use" in r.get("memory", {}):
                    tally.heap.setdefault(r["rank"], []).append(
                        (time.monotonic() - start, r["memory"]["malloc_in_use"], r["memory"]["malloc_free"])
                    )
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            tally.errors.append(f"memory sample: {exc}")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def soak(
    url: str,
    key: str | None,
    clients: int,
    minutes: float,
    requests: int | None,
    max_tokens: int,
    warmup: float,
    sample: float,
    max_body: int,
    seed: int,
    timeout: float = 300,
) -> tuple[Tally, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    tally = Tally()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        health = (await http.get("/health")).json()
        context_chars = CONTEXT_CHARS
        start = time.monotonic()
        deadline = start + minutes * 60
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(http, tally, start, sample, stop))
        rng = random.Random(seed)

        async def run(i: int) -> None:
            client = Client(http, model, max_tokens, seed * 1000 + i, tally, max_body, context_chars)
            while time.monotonic() < deadline and (requests is None or tally.requests < requests):
                await client.one(rng.choices(KINDS, WEIGHTS)[0])

        await asyncio.gather(*(run(i) for i in range(clients)))
        stop.set()
        await sampler
        after = (await http.get("/health")).json()
    return tally, {
        "model": model,
        "world_size": health["world_size"],
        "elapsed_s": round(time.monotonic() - start, 1),
        "health_after": after,
    }


def _outside_mlx(rss: list[tuple[float, int]], mlx: list[tuple[float, int, int]]) -> dict:
    """RSS minus MLX's active + cache memory: at the start, lowest, highest and at the end (MB)."""
    rest = [(r - a - c) / 2**20 for (_, r), (_, a, c) in zip(rss, mlx)]
    return {k: round(v, 1) for k, v in (("start", rest[0]), ("min", min(rest)), ("max", max(rest)), ("end", rest[-1]))}


def _after_warmup(series: list[tuple[float, int]], warmup: float, window: float) -> tuple[float, float]:
    """The median of the first and of the last ``window`` s after the warm-up. (RSS swings by
    the requests in flight at the moment of a sample, their KV caches: one sample says little.)"""
    after = [(t, v) for t, v in series if t >= warmup] or [series[-1]]
    first, last = after[0][0], after[-1][0]
    return (
        statistics.median(v for t, v in after if t <= first + window),
        statistics.median(v for t, v in after if t >= last - window),
    )


def report(tally: Tally, info: dict, warmup: float, window: float) -> dict:
    lat = {
        k: {"n": len(v), "p50": percentile(v, 50), "p90": percentile(v, 90), "p99": percentile(v, 99)}
        for k, v in tally.latencies.items()
        if v
    }
    memory = {}
    for rank, series in sorted(tally.rss.items()):
        base, end = _after_warmup(series, warmup, window)
        memory[rank] = {
            "rss_start_mb": round(series[0][1] / 2**20, 1),
            "rss_after_warmup_mb": round(base / 2**20, 1),
            "rss_end_mb": round(end / 2**20, 1),
            "rss_max_mb": round(max(r for _, r in series) / 2**20, 1),
            "growth_after_warmup_pct": round(100 * (end - base) / base, 2),
            "mlx_active_end_mb": round(tally.mlx[rank][-1][1] / 2**20, 1),
            "mlx_cache_end_mb": round(tally.mlx[rank][-1][2] / 2**20, 1),
            "mlx_active_max_mb": round(max(a for _, a, _ in tally.mlx[rank]) / 2**20, 1),
            # what MLX's own figures do not explain (the allocator, Python, the tokenizer): flat
            # when nothing leaks, whatever MLX's buffer cache (bounded by mlx_cache_limit) does
            "rss_outside_mlx_mb": _outside_mlx(series, tally.mlx[rank]),
        }
        if heap := tally.heap.get(rank):  # glibc's heaps: memory kept in use, or freed and kept
            for i, kind in ((1, "malloc_in_use"), (2, "malloc_free")):
                a, b = _after_warmup([(x[0], x[i]) for x in heap], warmup, window)
                memory[rank][f"{kind}_mb"] = {"after_warmup": round(a / 2**20, 1), "end": round(b / 2**20, 1)}
    return {
        **info,
        "requests": tally.requests,
        "errors": len(tally.errors),
        "error_samples": tally.errors[:10],
        "latency_s": lat,
        # when the slowest requests started tells a cold start from a stall mid-run
        "slowest": [
            {"kind": k, "started_s": round(at, 1), "took_s": round(took, 2)}
            for took, k, at in sorted(tally.timed, reverse=True)[:10]
        ],
        "memory": memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--key", help="API key, if the cluster has one")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--requests", type=int, help="stop after this many requests (default: run the whole time)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=120, help="seconds before the RSS baseline is taken")
    parser.add_argument(
        "--window", type=float, default=120, help="seconds whose median RSS is the baseline, and the end figure"
    )
    parser.add_argument("--sample", type=float, default=10, help="seconds between memory samples")
    parser.add_argument("--max-body", type=int, default=MAX_BODY, help="the server's max_body_bytes")
    parser.add_argument("--max-growth", type=float, default=5.0, help="RSS growth (%%) that fails the run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds a client waits for an answer (a timeout is an error)"
    )
    parser.add_argument("--out", help="write the report as JSON here")
    opts = parser.parse_args()
    tally, info = asyncio.run(
        soak(
            opts.url.rstrip("/"),
            opts.key,
            opts.clients,
            opts.minutes,
            opts.requests,
            opts.max_tokens,
            opts.warmup,
            opts.sample,
            opts.max_body,
            opts.seed,
            opts.timeout,
        )
    )
    result = report(tally, info, opts.warmup, opts.window)
    print(json.dumps(result, indent=2))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(
                result | {"rss_series": tally.rss, "mlx_series": tally.mlx, "heap_series": tally.heap}, f, indent=1
            )
    grew = [r for r, m in result["memory"].items() if m["growth_after_warmup_pct"] >= opts.max_growth]
    return 0 if not result["errors"] and not grew else 1


if __name__ == "__main__":
    sys.exit(main())
