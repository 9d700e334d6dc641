"""Bad requests on a real 1-rank server: huge bodies, over-long prompts, wrong keys, clients
that leave. The server must refuse each cheaply, in its own error shape, and keep serving."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse

import httpx
import pytest
from conftest import running_cluster

pytestmark = pytest.mark.slow

KEY = "guard-test-key-0123456789"
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    with running_cluster(
        tiny_llama,
        1,
        tmp_path_factory.mktemp("guard"),
        api_key=KEY,
        args=("--max-body-bytes", str(MAX_BODY), "--api-key-failures", "3"),
    ) as c:
        yield c


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _chat(cluster, content: str, **kw) -> dict:
    return {"model": cluster.model_id, "messages": [{"role": "user", "content": content}], "temperature": 0} | kw


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_health_answers_while_huge_requests_are_refused_or_tokenized(cluster):
    """Multi-megabyte requests (under and over the body cap) and a prompt just under the
    character bound, all at once: /health keeps answering quickly and each is refused by name."""
    words = "the quick brown fox jumps over the lazy dog "
    results: dict[str, httpx.Response] = {}

    def post(name: str, content: str) -> None:
        results[name] = httpx.post(
            cluster.url("/v1/chat/completions"),
            json=_chat(cluster, content, max_tokens=2),
            headers=_auth(),
            timeout=120,
        )

    big = words * (900_000 // len(words))  # 0.9 MB: under the body cap, far over the character bound
    long = words * (25_000 // len(words))  # 25 k characters: must be tokenized to find it too long
    jobs = [threading.Thread(target=post, args=(f"big{i}", big)) for i in range(3)]
    jobs += [threading.Thread(target=post, args=(f"long{i}", long)) for i in range(3)]
    jobs.append(threading.Thread(target=post, args=("huge", words * (3_000_000 // len(words)))))
    latencies = []
    for j in jobs:
        j.start()
    while any(j.is_alive() for j in jobs):
        started = time.perf_counter()
        assert httpx.get(cluster.url("/health"), timeout=30).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    for j in jobs:
        j.join()
    assert max(latencies) < 2.0, latencies
    huge = results["huge"]
    assert huge.status_code == 413, huge.text
    assert str(MAX_BODY) in _error(huge)["message"] and "max_body_bytes" in _error(huge)["message"]
    for name in ("big0", "long0"):
        r = results[name]
        assert r.status_code == 400, r.text
        assert _error(r)["code"] == "context_length_exceeded" and _error(r)["param"] == "messages"
    assert "characters" in _error(results["big0"])["message"]  # refused before tokenizing
    assert "tokens" in _error(results["long0"])["message"]
    assert (
        httpx.post(
            cluster.url("/v1/chat/completions"), json=_chat(cluster, "hi", max_tokens=2), headers=_auth(), timeout=60
        ).status_code
        == 200
    )


def test_a_chunked_body_is_capped_while_it_arrives(cluster):
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(64):  # 4 MiB in 64 KiB chunks, with no Content-Length
            sent += 65536
            yield b"x" * 65536

    r = httpx.post(
        cluster.url("/v1/completions"),
        content=chunks(),
        headers=_auth() | {"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert _error(r)["code"] == "request_too_large"


def _raw_post(cluster, length: int, body: bytes, extra: str = "") -> bytes:
    """POST over a bare socket as a plain client does: the whole head and ``body`` written
    before anything is read; returns all the server answered until it closed."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()
    api = urllib.parse.urlsplit(cluster.url("/"))
    with socket.create_connection((api.hostname, api.port), timeout=60) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_client_that_sends_its_whole_oversized_body_reads_the_413(cluster):
    """A plain client writes the whole body before it reads the answer. The server reads and
    drops the excess before answering, so the client gets the 413, not a connection reset
    (32 MiB: more than loopback's socket buffers can hold unread)."""
    body = b"x" * (32 * MAX_BODY)
    answer = _raw_post(cluster, len(body), body)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request_too_large" in rest


def test_a_client_that_waits_to_continue_gets_the_413_without_sending_its_body(cluster):
    """curl sends "Expect: 100-continue" with large bodies and waits: the server answers the
    413 at once and never asks for the body (no "100 Continue", nothing uploaded)."""
    answer = _raw_post(cluster, 8 * MAX_BODY, b"", "Expect: 100-continue\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]


def test_the_key_is_checked_before_the_body_is_read(cluster):
    # an unauthenticated client learns nothing about the body: too large, or not JSON, it is 401
    r = httpx.post(cluster.url("/v1/chat/completions"), content=b"{" * (MAX_BODY * 2), timeout=60)
    assert r.status_code == 401, r.text
    r = httpx.post(cluster.url("/v1/completions"), content=b"not json", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert _error(r)["code"] == "invalid_api_key"
    r = httpx.post(cluster.url("/v1/completions"), content=b"not json", headers=_auth())
    assert r.status_code == 400, r.text  # with the key, the body is read and refused as not JSON


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
def test_a_client_that_leaves_is_a_cancellation_not_an_error(cluster, route):
    """On every surface (the OpenAI routes and the adapters' non-streamed replies alike)."""
    body = _chat(cluster, "go", max_tokens=1900)
    if route == "/api/chat":  # Ollama's shape
        # greedy, as above: a sampled answer of the tiny model may reach its end within the second
        options = {"num_predict": 1900, "temperature": 0}
        body = {"model": body["model"], "messages": body["messages"], "stream": False, "options": options}

    def error_count() -> float:
        metrics = httpx.get(cluster.url("/metrics"), headers=_auth()).text
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("mjc_errors_total"))

    errors_before = httpx.get(cluster.url("/errors"), headers=_auth()).json()["data"]
    count_before = error_count()
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request the client gives up on
        httpx.post(cluster.url(route), json=body, headers=_auth(), timeout=1.0)
    deadline = time.monotonic() + 30
    while httpx.get(cluster.url("/health")).json()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(cluster.url("/health")).json()["active"] == 0
    errors_after = httpx.get(cluster.url("/errors"), headers=_auth()).json()["data"]
    assert errors_after == errors_before, errors_after[:3]
    metrics = httpx.get(cluster.url("/metrics"), headers=_auth()).text
    assert f'mjc_generations_total{{route="{route}",status="cancelled"}}' in metrics
    assert error_count() == count_before
    requests = httpx.get(cluster.url("/requests"), headers=_auth()).json()["data"]
    assert requests[0]["status"] == "cancelled" and requests[0]["error"] is None


def test_repeated_wrong_keys_slow_that_address_down(cluster):
    # runs last in this module: it blocks 127.0.0.1 for a while
    wrong = {"Authorization": "Bearer wrong-key-wrong-key"}
    for _ in range(3):  # api_key_failures=3 free wrong keys
        assert httpx.get(cluster.url("/v1/models"), headers=wrong).status_code == 401
    assert httpx.get(cluster.url("/v1/models"), headers=wrong).status_code == 401  # the 4th blocks for 1 s
    r = httpx.get(cluster.url("/v1/models"), headers=_auth())  # even the right key waits: no oracle
    assert r.status_code == 429, r.text
    assert _error(r)["code"] == "too_many_failed_keys" and int(r.headers["retry-after"]) >= 1
    assert httpx.get(cluster.url("/health")).status_code == 200  # /health stays open
    time.sleep(int(r.headers["retry-after"]) + 0.2)
    assert httpx.get(cluster.url("/v1/models"), headers=_auth()).status_code == 200  # a right key clears it
    for _ in range(3):
        assert httpx.get(cluster.url("/v1/models"), headers=wrong).status_code == 401
