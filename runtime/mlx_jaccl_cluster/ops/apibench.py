"""Streaming clients against an OpenAI-compatible API: TTFT, decode rate, tokens/s under load.

Shared by ``benchmarks/runtime_bench.py`` and ``playbooks/bench.yml`` (``mode=api``, run on
the controller against the deployed rank 0)::

    python -m mlx_jaccl_cluster.ops.apibench --url http://127.0.0.1:8080 --model M \
        --clients 1 4 8 --out api.json

Decode rate = (tokens - 1) / (time of the last token - time of the first token);
TTFT = request sent -> first chunk with text. Standard library only.

Every request gets its own prompt by default (:class:`Prompts`): a server that caches
prompts would otherwise serve a repeated one from its cache and look faster than real
traffic lets it be. ``--same-prompt`` sends one prompt over and over (the cache-on figure).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import math
import os
import statistics
import sys
import threading
import time
import urllib.parse


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, nearest rank (``mjc-bench`` uses it too)."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def stream_chat(
    port: int,
    body: dict,
    io_timeout: float,
    deadline: float,
    host: str = "127.0.0.1",
    headers: dict | None = None,
    keep_times: bool = False,
) -> dict:
    """One streaming chat request; times of the first and last token, usage, text, error.
    ``keep_times``: also every chunk's arrival time (``times``, perf_counter seconds), for
    inter-token latencies."""
    res: dict = {"ok": False, "error": None, "completion_tokens": None, "text": ""}
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    res["start"] = t0
    first = last = None
    pieces = []
    times: list[float] = []
    conn = http.client.HTTPConnection(host, port, timeout=io_timeout)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=payload,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            res["error"] = f"HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}"
            return res
        finish = None
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter()
            if now - t0 > deadline:
                res["error"] = f"request still running after {deadline:.0f} s (deadline)"
                break
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                res["ok"] = True
                break
            obj = json.loads(data)
            if "error" in obj:
                res["error"] = f"error in stream: {json.dumps(obj)[:500]}"
                break
            if obj.get("usage"):
                res["completion_tokens"] = obj["usage"].get("completion_tokens")
                res["prompt_tokens"] = obj["usage"].get("prompt_tokens")
                cached = (obj["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                if cached is not None:
                    res["cached_tokens"] = cached
            for ch in obj.get("choices") or []:
                content = (ch.get("delta") or {}).get("content") or ch.get("text")
                if content:
                    pieces.append(content)
                    times.append(now)
                    if first is None:
                        first = now
                    last = now
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
                    if first is not None:
                        last = now
        res["finish_reason"] = finish
        if not res["ok"] and res["error"] is None:
            res["error"] = "stream ended without [DONE] (server closed the connection)"
    except Exception as exc:  # socket timeout, reset, bad JSON: all are results here
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        res["end"] = time.perf_counter()
    res["text"] = "".join(pieces)
    if keep_times:
        res["times"] = times
    if first is not None:
        res["ttft_s"] = first - t0
        n = res["completion_tokens"]
        if n and n > 1 and last > first:
            res["decode_tps"] = (n - 1) / (last - first)
    return res


def _per_client(body: dict | list[dict], n: int) -> list[dict]:
    """One body for every client, or one body per client (distinct prompts)."""
    if isinstance(body, dict):
        return [body] * n
    if len(body) < n:
        raise ValueError(f"{n} clients need {n} request bodies, got {len(body)}")
    return list(body)


def concurrent(port: int, body: dict | list[dict], clients: int, io_timeout: float, deadline: float, **where) -> dict:
    """``clients`` streaming requests released together; aggregate tok/s over the whole span.
    ``body``: one for all, or a list (client i sends ``body[i]``)."""
    bodies = _per_client(body, clients)
    results: list[dict | None] = [None] * clients
    gate = threading.Barrier(clients)

    def worker(i: int) -> None:
        try:
            gate.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        results[i] = stream_chat(port, bodies[i], io_timeout, deadline, **where)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline + io_timeout + 15)
    done = [r for r in results if r is not None]
    errors = [r["error"] for r in done if r["error"]]
    if len(done) < clients:
        errors.append(f"{clients - len(done)} client thread(s) never returned")
    return summarize_batch(done, errors)


def sequential(port: int, body: dict | list[dict], n: int, io_timeout: float, deadline: float, **where) -> dict:
    done, errors = [], []
    for b in _per_client(body, n):
        r = stream_chat(port, b, io_timeout, deadline, **where)
        done.append(r)
        if r["error"]:
            errors.append(r["error"])
            break
    return summarize_batch(done, errors)


def summarize_batch(done: list[dict], errors: list[str]) -> dict:
    tokens = sum(r.get("completion_tokens") or 0 for r in done)
    span = (max(r["end"] for r in done) - min(r["start"] for r in done)) if done else None
    return {
        "requests": len(done),
        "errors": errors,
        "completion_tokens": [r.get("completion_tokens") for r in done],
        "span_s": span,
        "aggregate_tps": tokens / span if span and not errors else None,
        "ttfts": [r.get("ttft_s") for r in done],
        "ttft_s_median": median([r.get("ttft_s") for r in done]),
        "decode_tps_median": median([r.get("decode_tps") for r in done]),
        "texts_identical": len({r["text"] for r in done}) == 1 if done else None,
        "prompt_tokens": [r.get("prompt_tokens") for r in done],
        "cached_tokens": [r.get("cached_tokens") for r in done],
        "text0": done[0]["text"] if done else "",
    }


PROMPT = "Write a long story about a dragon who learns to bake bread in a small village."


def numbered_prompt(k: int) -> str:
    """Candidate ``k`` of the distinct prompts: a five-digit number, then :data:`PROMPT`.

    The number comes first, so that two prompts share no more than the chat template's
    head and a prompt cache can reuse nothing of substance; its digits are those of ``k``
    reversed, so that consecutive requests differ in the very first digit."""
    return f"{str(k % 100_000).zfill(5)[::-1]}: {PROMPT}"


class Prompts:
    """Distinct prompts of one token length, numbered 0, 1, 2...: the same number is the
    same text in every process, so that systems measured side by side get the same requests.

    ``length_of(text)`` (optional) gives a prompt's token count (chat template included).
    With it, only candidates of the commonest length among the first ``probe`` are kept, so
    every prompt costs the same prefill (a tokenizer merges some digit groups, not others).
    Without it (no tokenizer at hand, e.g. against a remote API), lengths are not checked
    here; the server's ``usage.prompt_tokens`` shows them."""

    def __init__(self, length_of=None, probe: int = 200, limit: int = 100_000):
        self._length_of = length_of
        self._limit = limit
        self._kept: list[str] = []
        self._next = 0
        self.length = None
        if length_of is not None:
            counts: dict[int, int] = {}
            for k in range(probe):
                n = length_of(numbered_prompt(k))
                counts[n] = counts.get(n, 0) + 1
            self.length = max(sorted(counts), key=lambda n: counts[n])

    def __getitem__(self, i: int) -> str:
        if i < 0:
            raise IndexError(f"prompt number {i} is negative")
        while len(self._kept) <= i:
            if self._next >= self._limit:
                raise IndexError(
                    f"only {len(self._kept)} distinct prompts of {self.length} tokens among "
                    f"{self._limit} candidates; prompt {i} was asked for"
                )
            text = numbered_prompt(self._next)
            self._next += 1
            if self._length_of is None or self._length_of(text) == self.length:
                self._kept.append(text)
        return self._kept[i]

    def take(self, start: int, n: int) -> list[str]:
        return [self[i] for i in range(start, start + n)]


def api_body(model: str, tokens: int, prompt: str = PROMPT) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _p99_ms(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return percentile(known, 99) * 1000 if known else None


def api_bench(
    url: str,
    model: str,
    clients: list[int],
    tokens: int,
    rounds: int,
    api_key: str = "",
    io_timeout: float = 120.0,
    deadline: float = 600.0,
    same_prompt: bool = False,
) -> dict:
    """``rounds`` batches of N concurrent streaming clients for each N in ``clients`` (after one
    warm-up). Every request has a prompt of its own unless ``same_prompt``."""
    parts = urllib.parse.urlsplit(url)
    where = {
        "host": parts.hostname or "127.0.0.1",
        "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
    }
    port = parts.port or 80
    prompts = Prompts()
    sent = [0]

    def bodies(n: int) -> list[dict]:
        if same_prompt:
            return [api_body(model, tokens)] * n
        out = [api_body(model, tokens, p) for p in prompts.take(sent[0], n)]
        sent[0] += n
        return out

    health = _health(where["host"], port)
    warm = stream_chat(port, bodies(1)[0], io_timeout, deadline, **where)
    if warm["error"]:
        raise RuntimeError(f"the API at {url} did not answer a warm-up request: {warm['error']}")
    runs = []
    for n in clients:
        batches, ttfts = [], []
        for _ in range(rounds):
            batch = concurrent(port, bodies(n), n, io_timeout, deadline, **where)
            batches.append(batch)
            ttfts += batch.pop("ttfts")
        rates = [b["aggregate_tps"] for b in batches if b["aggregate_tps"] is not None]
        lengths = sorted({t for b in batches for t in b["prompt_tokens"] if t is not None})
        runs.append(
            {
                "clients": n,
                "requests": sum(b["requests"] for b in batches),
                "completion_tokens": sum(sum(t or 0 for t in b["completion_tokens"]) for b in batches),
                "aggregate_tps": median(rates),
                "aggregate_tps_range": [min(rates), max(rates)] if rates else None,
                "decode_tps_median": median([b["decode_tps_median"] for b in batches]),
                "ttft_ms_median": (median(ttfts) or 0) * 1000 if ttfts else None,
                "ttft_ms_p99": _p99_ms(ttfts),
                "prompt_tokens_seen": lengths,
                "cached_tokens_median": median([t for b in batches for t in b["cached_tokens"]]),
                "errors": [e for b in batches for e in b["errors"]],
            }
        )
    return {
        "kind": "api",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "url": url,
        "model": model,
        "max_tokens": tokens,
        "rounds": rounds,
        "prompts": "same" if same_prompt else "distinct",
        "world_size": health.get("world_size"),
        "backend": health.get("backend"),
        "runs": runs,
    }


def _health(host: str, port: int) -> dict:
    """Rank 0's /health body ({} when it does not answer with JSON)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read() or b"{}")
    except (OSError, ValueError):
        return {}
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_jaccl_cluster.ops.apibench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="rank 0's API, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="rounds per client count; the median of 9 is stable "
        "where the median of 2 or 3 moved by 20 %% between runs",
    )
    p.add_argument(
        "--same-prompt",
        action="store_true",
        help="send one prompt over and over (a prompt cache serves it: the cache-on figure); "
        "default: a distinct prompt per request",
    )
    p.add_argument("--api-key", default=os.environ.get("MJC_API_KEY", ""), help="default: $MJC_API_KEY")
    p.add_argument("--out", required=True)
    opts = p.parse_args(argv)
    result = api_bench(
        opts.url, opts.model, opts.clients, opts.tokens, opts.rounds, opts.api_key, same_prompt=opts.same_prompt
    )
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
