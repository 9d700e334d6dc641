"""Observability of a running 2-rank cluster: heartbeat memory reaches rank 0, the link
probe runs in lockstep while idle without disturbing requests, request and error
history, /metrics, and the API key on every data endpoint."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import start_cluster
from prometheus_client.parser import text_string_to_metric_families

from mlx_jaccl_cluster.engine.allocator import heap_stats

pytestmark = pytest.mark.slow

KEY = "obs-secret"
PROBE_ARGS = (
    "--probe-latency-interval",
    "0.2",
    "--probe-bandwidth-interval",
    "0.5",
    "--probe-bandwidth-bytes",
    "65536",
    "--probe-steps",
    "2",
)


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    c = start_cluster(tiny_llama, 2, tmp_path_factory.mktemp("observe"), args=PROBE_ARGS, api_key=KEY)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def _get(cluster, path: str) -> httpx.Response:
    r = httpx.get(cluster.url(path), headers=cluster.headers(), timeout=10)
    assert r.status_code == 200, r.text
    return r


def _state(cluster) -> dict:
    return _get(cluster, "/dashboard/state").json()


def _metrics(cluster) -> dict[tuple, float]:
    text = _get(cluster, "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_for(check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_heartbeat_memory_of_every_rank_reaches_rank_0(cluster):
    # a follower's figures are those of its last beat (each second): the first after its
    # READY carries the loaded model
    state = _wait_for(lambda: (lambda s: s if s["ranks"][1]["memory"].get("active") else None)(_state(cluster)), 5)
    assert [r["rank"] for r in state["ranks"]] == [0, 1]
    for r in state["ranks"]:
        assert r["up"], r
        assert r["memory"]["active"] > 0 and r["memory"]["rss"] > 10_000_000, r
        assert r["links"] and r["links"][0].startswith("127.0.0.1:")
    assert state["ranks"][1]["silent_s"] < 3
    m = _metrics(cluster)
    assert m[("mjc_rank_memory_bytes", (("kind", "rss"), ("rank", "1")))] > 10_000_000
    if heap_stats():  # glibc 2.33 or later: what malloc's heaps hold, in use (Python's objects at least) and free
        assert m[("mjc_rank_memory_bytes", (("kind", "malloc_in_use"), ("rank", "1")))] > 1_000_000
        assert ("mjc_rank_memory_bytes", (("kind", "malloc_free"), ("rank", "1"))) in m
    assert m[("mjc_rank_up", (("host", state["ranks"][1]["host"]), ("rank", "1")))] == 1
    assert m[("mjc_ranks_up", ())] == 2 and m[("mjc_world_size", ())] == 2


def test_each_rank_reports_what_its_prompt_cache_holds(cluster):
    """A finished chat leaves an entry on every rank (its shard of the KV cache): the
    heartbeat's prompt_cache figure shows it, as part of MLX's active memory."""
    r = httpx.post(
        cluster.url("/v1/chat/completions"),
        headers=cluster.headers(),
        json={"model": cluster.model_id, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    state = _wait_for(
        lambda: (lambda s: s if all(x["memory"].get("prompt_cache") for x in s["ranks"]) else None)(_state(cluster))
    )
    assert state, _state(cluster)
    for rank in state["ranks"]:
        assert 0 < rank["memory"]["prompt_cache"] < rank["memory"]["active"], rank
    assert _metrics(cluster)[("mjc_rank_memory_bytes", (("kind", "prompt_cache"), ("rank", "1")))] > 0


def test_link_probe_measures_while_idle(cluster):
    first = _state(cluster)["link"]
    link = _wait_for(lambda: (lambda s: s if s["probes"] >= first["probes"] + 4 else None)(_state(cluster)["link"]))
    assert link, f"the probe did not run: {first}"
    assert 0 < link["latency_s"] < 0.05
    assert link["bandwidth_bps"] > 1e6 and link["bandwidth_bytes"] == 65536
    assert link["latency_at"] > first["latency_at"]
    m = _metrics(cluster)
    assert m[("mjc_link_latency_seconds", ())] > 0 and m[("mjc_link_bandwidth_bytes_per_second", ())] > 0


def test_requests_between_probe_steps_stay_in_lockstep(cluster):
    """Probes run every 0.2 s between these requests; any rank out of step would give a
    checksum error (the group exits) or a different answer."""
    expected = cluster.chat("probe me", max_tokens=12)
    before = _state(cluster)["link"]["steps"]
    for i in range(12):
        time.sleep(0.05 * (i % 4))
        out = cluster.chat("probe me", max_tokens=12)
        assert out["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    state = _state(cluster)
    assert state["link"]["steps"] > before
    assert state["ranks_up"] == 2 and state["status"] == "ready"


def test_request_and_error_history(cluster):
    m0 = _metrics(cluster)
    route = "/v1/chat/completions"
    out = cluster.chat("history please", max_tokens=9)
    bad = httpx.post(
        cluster.url(route),
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        headers=cluster.headers(),
    )
    assert bad.status_code == 404
    rec = _get(cluster, "/requests").json()["data"][0]
    assert rec["route"] == route and rec["status"] in ("stop", "length")
    assert rec["prompt_tokens"] == out["usage"]["prompt_tokens"]
    assert rec["completion_tokens"] == out["usage"]["completion_tokens"]
    assert 0 < rec["ttft_s"] <= rec["duration_s"]
    err = _get(cluster, "/errors").json()["data"][0]
    assert err["route"] == route and err["status"] == 404 and err["type"] == "not_found_error"
    assert "nope" in err["message"]
    m1 = _metrics(cluster)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0) - m0.get(key, 0)

    assert delta("mjc_http_requests_total", route=route, status="200") == 1
    assert delta("mjc_http_requests_total", route=route, status="404") == 1
    assert delta("mjc_errors_total", route=route, type="not_found_error") == 1
    assert delta("mjc_generated_tokens_total", route=route) == out["usage"]["completion_tokens"]
    assert delta("mjc_prompt_tokens_total", route=route) == out["usage"]["prompt_tokens"]
    assert delta("mjc_time_to_first_token_seconds_count", route=route) == 1
    assert _wait_for(lambda: (lambda s: s["inflight"] == 0 and s["batch_size"] == 0)(_state(cluster)), 5)
    # the tokens/s series counts whole seconds: these tokens appear within a second or two
    assert _wait_for(lambda: sum(_state(cluster)["tokens_per_s"]) >= out["usage"]["completion_tokens"], 3)


def test_data_endpoints_need_the_key_but_health_and_page_do_not(cluster):
    for path in ("/metrics", "/requests", "/errors", "/dashboard/state"):
        r = httpx.get(cluster.url(path))
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(cluster.url("/health")).status_code == 200
    page = httpx.get(cluster.url("/dashboard"))
    assert page.status_code == 200 and 'data-key-required="true"' in page.text
    assert cluster.model_id not in page.text  # the open page carries no cluster data
    assert httpx.get(cluster.url("/dashboard/static/dashboard.js")).status_code == 200


def test_probe_off_sends_no_probe_steps(tiny_llama, cluster_factory):
    c = cluster_factory(tiny_llama, 2, args=("--probe-latency-interval", "0", "--probe-bandwidth-interval", "0"))
    c.wait_ready()
    time.sleep(2)
    c.chat("anything", max_tokens=4)
    time.sleep(1)
    link = _state(c)["link"]
    assert link["steps"] == 0 and link["latency_s"] is None and link["bandwidth_bps"] is None
    assert "mjc_link_latency_seconds" not in _get(c, "/metrics").text


def test_a_request_waits_for_at_most_one_probe_step(tiny_llama, cluster_factory):
    """With a long probe always due (24 steps of one 8 MiB all_sum each), requests are
    answered between its steps: their time to first token is a fraction of a probe, not
    the rest of one (which would average 12 steps)."""
    steps = 24
    c = cluster_factory(
        tiny_llama,
        2,
        args=(
            "--probe-latency-interval",
            "0",
            "--probe-bandwidth-interval",
            "0.01",
            "--probe-bandwidth-bytes",
            str(8 << 20),
            "--probe-steps",
            str(steps),
            "--probe-step-iters",
            "1",
        ),
    )
    c.wait_ready()
    first = _wait_for(lambda: (lambda s: s if s["steps"] >= 5 else None)(_state(c)["link"]), 30)
    assert first, "the probe never ran"
    started = time.monotonic()
    time.sleep(2)
    step_s = 2 / max(1, _state(c)["link"]["steps"] - first["steps"])  # it probes all the time while idle
    ttft = []
    for i in range(8):
        time.sleep(step_s * (i % 5) / 2)  # land at different points of a step
        c.chat("between the steps", max_tokens=1)
        ttft.append(_get(c, "/requests").json()["data"][0]["ttft_s"])
    ttft.sort()
    median = (ttft[3] + ttft[4]) / 2
    assert median < 6 * step_s, f"median TTFT {median:.3f} s with probe steps of {step_s:.3f} s ({ttft})"
    assert _state(c)["link"]["probes"] >= 1 and time.monotonic() - started > 2
