"""What the Ollama, Anthropic and Responses adapters cost over Chat Completions.

Sends the same short conversation, non-streamed and greedy, through each surface of a
running cluster, interleaved round by round so that load on the machine hits all alike,
and prints the median and p90 wall time per surface and the median of a refused request
(a 400 in that API's shape). Usage:

    python benchmarks/client_surfaces.py --url http://127.0.0.1:8080 --model NAME [--rounds 30] [--key KEY]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def bodies(model: str, max_tokens: int) -> dict[str, tuple[str, dict, dict]]:
    ask = "What is the weather in Paris?"
    return {
        "chat": (
            "/v1/chat/completions",
            {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": ask}],
            },
            {"model": model, "messages": "not a list"},
        ),
        "ollama": (
            "/api/chat",
            {
                "model": model,
                "stream": False,
                "options": {"num_predict": max_tokens, "temperature": 0},
                "messages": [{"role": "user", "content": ask}],
            },
            {"model": model, "messages": [], "options": {"mirostat": 2}},
        ),
        "anthropic": (
            "/v1/messages",
            {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": ask}],
            },
            {"model": model, "messages": [{"role": "user", "content": ask}]},
        ),
        "responses": (
            "/v1/responses",
            {"model": model, "max_output_tokens": max_tokens, "temperature": 0, "input": ask},
            {"model": model, "input": ask, "previous_response_id": "resp_1"},
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8)
    opts = parser.parse_args()
    headers = {"Authorization": f"Bearer {opts.key}"} if opts.key else {}
    surfaces = bodies(opts.model, opts.max_tokens)
    ok: dict[str, list[float]] = {name: [] for name in surfaces}
    bad: dict[str, list[float]] = {name: [] for name in surfaces}
    with httpx.Client(base_url=opts.url, headers=headers, timeout=120) as client:
        for path, body, _ in surfaces.values():  # warm up: prompt cache, first-call costs
            client.post(path, json=body).raise_for_status()
        for _ in range(opts.rounds):
            for name, (path, body, wrong) in surfaces.items():
                start = time.perf_counter()
                client.post(path, json=body).raise_for_status()
                ok[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                r = client.post(path, json=wrong)
                bad[name].append(time.perf_counter() - start)
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    print(
        f"{'surface':<10} {'median ms':>10} {'p90 ms':>8} {'refused ms':>11}   ({opts.rounds} rounds, "
        f"{opts.max_tokens} tokens)"
    )
    for name in surfaces:
        times = sorted(ok[name])
        p90 = times[int(0.9 * (len(times) - 1))]
        print(
            f"{name:<10} {statistics.median(times) * 1e3:>10.1f} {p90 * 1e3:>8.1f} "
            f"{statistics.median(bad[name]) * 1e3:>11.1f}"
        )


if __name__ == "__main__":
    main()
