"""Real ranks with a man in the middle of the control channel (tests/control_relay.py):
rank 1 reaches rank 0 through a relay that knows everything but the cluster secret. The
group forms and serves through it; a frame it replays or forges makes the receiving rank
refuse it, name the peer in its log and follow the crash-only rule (the follower exits,
rank 0 answers 503 and exits for a restart), instead of running a step rank 0 never sent."""

from __future__ import annotations

import time

import httpx
import pytest
from control_relay import TO_FOLLOWER, TO_LEADER, Relay

from mlx_jaccl_cluster.cluster import BEAT, STEP, TAG_BYTES, encode_frame

pytestmark = pytest.mark.slow


def _relayed_cluster(model, cluster_factory):
    """Rank 0 as usual; rank 1 told that rank 0 is the relay."""
    cluster = cluster_factory(model, 2, order=[0])
    host, port = cluster.env["MJC_CONTROL"].rsplit(":", 1)
    relay = Relay((host, int(port)))
    cluster.env = cluster.env | {"MJC_CONTROL": f"127.0.0.1:{relay.port}"}
    cluster.spawn(1)
    cluster.wait_ready()
    return cluster, relay


def _ends_crash_only(cluster) -> None:
    """Rank 0 says lost (503) or has already exited; both ranks exit non-zero, promptly."""
    status, health = cluster.health()
    assert status in (0, 503), (status, health)  # 0: rank 0 already gone (connection refused)
    if status == 503:
        assert health.get("status") in ("lost", "failed"), health
    for rank in (1, 0):
        code = cluster.procs[rank].wait(timeout=30)
        assert code != 0, f"rank {rank} exited 0\n{cluster.all_logs()}"


def test_a_replayed_step_is_refused_by_the_follower(tiny_llama, cluster_factory):
    cluster, relay = _relayed_cluster(tiny_llama, cluster_factory)
    try:
        assert cluster.chat("hello", max_tokens=4)["choices"][0]["message"]["content"]  # served through the relay
        steps_before = len(relay.frames(TO_FOLLOWER, STEP))
        assert steps_before > 0
        replayed: list[bytes] = []

        def replay_next_step(direction: str, raw: bytes) -> list[bytes]:
            if direction == TO_FOLLOWER and raw[0] == STEP and not replayed:
                replayed.append(raw)
                return [raw, raw]  # the request inserted twice, were it taken
            return [raw]

        relay.tamper = replay_next_step
        body = {"model": cluster.model_id, "messages": [{"role": "user", "content": "again"}], "max_tokens": 8}
        r = httpx.post(cluster.url("/v1/chat/completions"), json=body, timeout=60)
        assert r.status_code == 503, r.text  # never a completion the ranks disagree on
        assert replayed
        _ends_crash_only(cluster)
        follower_log = cluster.log(1)
        assert f"refused a frame from rank 0 at 127.0.0.1:{relay.port}" in follower_log, cluster.all_logs()
        assert "replayed or reordered" in follower_log
        assert "checksum" not in follower_log  # refused on arrival: the ranks never ran different steps
    finally:
        relay.close()


def test_a_forged_frame_is_refused_by_rank_0(tiny_llama, cluster_factory):
    cluster, relay = _relayed_cluster(tiny_llama, cluster_factory)
    try:
        # a heartbeat as the follower would send it (sequence, memory figures), tag guessed
        relay.inject(TO_LEADER, encode_frame(BEAT, b"\0" * 8 + b'{"rss":1}' + b"\0" * TAG_BYTES))
        deadline = time.monotonic() + 20
        while "refused a frame" not in cluster.log(0) and time.monotonic() < deadline:
            time.sleep(0.1)
        _ends_crash_only(cluster)
        assert "refused a frame from rank 1 (127.0.0.1) and dropped its connection: bad tag" in cluster.log(0)
    finally:
        relay.close()
