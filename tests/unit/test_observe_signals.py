"""The observability signals on their own: the link probe's schedule and steps, the
request/error history, the Prometheus registry per app, the backend topology."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import mlx.core as mx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mlx_jaccl_cluster.api.metrics import ERROR_HISTORY, RATE_SECONDS, REQUEST_HISTORY, Observer
from mlx_jaccl_cluster.engine.link_probe import BANDWIDTH, LATENCY, LinkProbe, run_step
from mlx_jaccl_cluster.settings import Settings, backend_links
from mlx_jaccl_cluster.state import LinkStats


def _settings(tmp_path, **kw) -> Settings:
    return Settings(model=tmp_path, world_size=1, **kw)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _samples(n, value):
    return [value] * n


# --- the link probe ------------------------------------------------------------------
def test_probe_runs_latency_then_bandwidth_in_small_steps_then_waits(tmp_path):
    s = _settings(
        tmp_path,
        probe_latency_interval=10,
        probe_bandwidth_interval=60,
        probe_steps=3,
        probe_step_iters=2,
        probe_bandwidth_bytes=1 << 20,
    )
    clock, link = Clock(), LinkStats()
    probe = LinkProbe(s, link, clock)
    assert probe.wait() == 0.0
    for _ in range(3):
        spec = probe.next_step()
        assert spec == {"k": LATENCY, "it": 2}
        assert probe.wait() == 0.0  # mid-probe: the engine must not block
        probe.record(spec, _samples(2, 1e-4), 0.001)
    assert link.latency_s == pytest.approx(1e-4) and link.probes == 1 and link.steps == 3
    for _ in range(3):
        spec = probe.next_step()
        assert spec == {"k": BANDWIDTH, "it": 2, "n": 1 << 20}
        probe.record(spec, _samples(2, 1e-3), 0.003)
    assert link.bandwidth_bps == pytest.approx((1 << 20) / 1e-3) and link.bandwidth_bytes == 1 << 20
    assert link.probes == 2 and link.last_step_s == 0.003 and link.max_step_s == 0.003
    assert probe.next_step() is None
    assert probe.wait() == pytest.approx(10)
    clock.now += 10
    assert probe.next_step()["k"] == LATENCY


def test_probe_steps_resume_after_a_request(tmp_path):
    """A request between steps only delays the probe; the figure is the median of all steps."""
    s = _settings(tmp_path, probe_latency_interval=5, probe_bandwidth_interval=0, probe_steps=2)
    link = LinkStats()
    probe = LinkProbe(s, link, Clock())
    spec = probe.next_step()
    probe.record(spec, [1.0, 1.0], 0.1)
    # ... the engine serves a request here; the next idle moment continues the same probe
    assert probe.next_step() == spec
    probe.record(spec, [3.0, 3.0], 0.1)
    assert link.latency_s == 2.0 and link.probes == 1


def test_probe_off(tmp_path):
    probe = LinkProbe(_settings(tmp_path, probe_latency_interval=0, probe_bandwidth_interval=0), LinkStats(), Clock())
    assert not probe.enabled and probe.wait() is None and probe.next_step() is None


def test_probe_only_bandwidth(tmp_path):
    probe = LinkProbe(_settings(tmp_path, probe_latency_interval=0), LinkStats(), Clock())
    assert probe.next_step()["k"] == BANDWIDTH


def test_probe_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="probe_latency_interval"):
        _settings(tmp_path, probe_latency_interval=-1)
    with pytest.raises(ValueError, match="probe_bandwidth_bytes"):
        _settings(tmp_path, probe_bandwidth_bytes=2)


def test_run_step_times_real_collectives_on_a_one_rank_group(tmp_path):
    group = mx.distributed.init()
    assert len(run_step(group, {"k": LATENCY, "it": 3})) == 3
    assert len(run_step(group, {"k": BANDWIDTH, "it": 2, "n": 4096})) == 2
    probe = LinkProbe(_settings(tmp_path, probe_steps=1, probe_bandwidth_bytes=4096), LinkStats())
    for _ in range(2):
        probe.run(group, probe.next_step())
    assert probe.link.latency_s > 0 and probe.link.bandwidth_bps > 0 and probe.link.probes == 2


@pytest.mark.parametrize("spec", [{"k": "lat", "it": 0}, {"k": "x", "it": 1}, {"k": "lat"}])
def test_run_step_refuses_a_bad_spec(spec):
    with pytest.raises(ValueError, match="probe step"):
        run_step(mx.distributed.init(), spec)


# --- request and error history, metrics ------------------------------------------------
@dataclass
class FakePiece:
    events: list = field(default_factory=list)
    finish_reason: str | None = None


async def _pieces(pieces, fail: Exception | None = None):
    for p in pieces:
        await asyncio.sleep(0.01)
        yield p
    if fail is not None:
        raise fail


def _drain(observer, route, prompt, source):
    async def run():
        return [p async for p in observer.watch(route, prompt, source)]

    return asyncio.run(run())


def _value(observer: Observer, name: str, **labels) -> float:
    for family in text_string_to_metric_families(generate_latest(observer.registry).decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_watch_records_a_finished_request():
    obs = Observer()
    route = "/v1/chat/completions"
    out = _drain(obs, route, 7, _pieces([FakePiece([1]), FakePiece([2, 3]), FakePiece([4], "length")]))
    assert len(out) == 3
    [rec] = obs.request_history()
    assert rec["route"] == route and rec["prompt_tokens"] == 7 and rec["completion_tokens"] == 4
    assert rec["status"] == "length" and rec["error"] is None
    assert 0 < rec["ttft_s"] < rec["duration_s"]
    assert rec["tok_s"] > 0 and "_start" not in rec
    assert _value(obs, "mjc_generated_tokens_total", route=route) == 4
    assert _value(obs, "mjc_prompt_tokens_total", route=route) == 7
    assert _value(obs, "mjc_time_to_first_token_seconds_count", route=route) == 1
    assert _value(obs, "mjc_time_per_output_token_seconds_count", route=route) == 1
    assert _value(obs, "mjc_generations_total", route=route, status="length") == 1
    assert sum(obs.tokens_per_second(now=rec["time"] + 2)) == 4


def test_watch_records_errors_and_cancellations():
    class Boom(Exception):
        message = "request timed out after 1 s"

    obs = Observer()
    with pytest.raises(Boom):
        _drain(obs, "/v1/completions", 3, _pieces([FakePiece([1])], fail=Boom()))
    _drain(obs, "/v1/completions", 3, _pieces([]))  # the client left before any token
    cancelled, failed = obs.request_history()
    assert failed["status"] == "error" and failed["error"] == "request timed out after 1 s"
    assert cancelled["status"] == "cancelled" and cancelled["ttft_s"] is None and cancelled["tok_s"] is None


def test_histories_keep_the_last_200_requests_and_50_errors():
    obs = Observer()
    for i in range(REQUEST_HISTORY + 5):
        _drain(obs, "/v1/completions", i, _pieces([]))
    for i in range(ERROR_HISTORY + 5):
        obs.error("/v1/completions", 400, "invalid_request_error", f"bad {i}")
    requests, errors = obs.request_history(), obs.error_history()
    assert len(requests) == REQUEST_HISTORY and requests[0]["prompt_tokens"] == REQUEST_HISTORY + 4
    assert len(errors) == ERROR_HISTORY and errors[0]["message"] == f"bad {ERROR_HISTORY + 4}"
    assert _value(obs, "mjc_errors_total", route="/v1/completions", type="invalid_request_error") == ERROR_HISTORY + 5
    json.dumps(requests), json.dumps(errors)  # the endpoints send them as JSON


def test_tokens_per_second_series_has_one_bucket_per_second():
    obs = Observer()
    obs._rate.extend([[100, 5], [102, 7]])
    series = obs.tokens_per_second(now=103.5)
    assert len(series) == RATE_SECONDS and series[-3:] == [5, 0, 7]


def test_each_observer_has_its_own_registry():
    a, b = Observer(), Observer()
    a.error("/x", 400, "t", "m")
    assert _value(a, "mjc_errors_total", route="/x", type="t") == 1
    with pytest.raises(KeyError):
        _value(b, "mjc_errors_total", route="/x", type="t")


def test_cluster_gauges_come_from_the_snapshot():
    obs = Observer()
    snap = {
        "world_size": 2,
        "ranks_up": 1,
        "queue_depth": 3,
        "inflight": 11,
        "batch_size": 8,
        "ranks": [
            {"rank": 0, "host": "a", "up": True, "silent_s": 0.0, "memory": {"active": 10, "rss": 20}},
            {"rank": 1, "host": "?", "up": False, "silent_s": None, "memory": {}},
        ],
        "link": {"latency_s": 5e-5, "bandwidth_bps": None, "last_step_s": 0.002, "probes": 4},
    }
    obs.watch_cluster(lambda: snap)
    assert _value(obs, "mjc_queue_depth") == 3 and _value(obs, "mjc_batch_size") == 8
    assert _value(obs, "mjc_ranks_up") == 1 and _value(obs, "mjc_world_size") == 2
    assert _value(obs, "mjc_rank_up", rank="0") == 1 and _value(obs, "mjc_rank_up", rank="1") == 0
    assert _value(obs, "mjc_rank_memory_bytes", rank="0", kind="rss") == 20
    assert _value(obs, "mjc_link_latency_seconds") == 5e-5 and _value(obs, "mjc_link_probes_total") == 4
    with pytest.raises(KeyError):
        _value(obs, "mjc_link_bandwidth_bytes_per_second")  # not measured yet: absent, not 0
    with pytest.raises(KeyError):
        _value(obs, "mjc_rank_heartbeat_age_seconds", rank="1")


# --- topology from the backend files ----------------------------------------------------
def test_backend_links_ring_and_jaccl(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"]]))
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([[None, "rdma_en4"], ["rdma_en3", None]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_IBV_DEVICES", str(devices))
    assert backend_links("ring") == [["10.0.0.1:5000"], ["10.0.0.2:5000"]]
    assert backend_links("jaccl") == [["rank 1: rdma_en4"], ["rank 0: rdma_en3"]]
    assert backend_links("nccl") == []
