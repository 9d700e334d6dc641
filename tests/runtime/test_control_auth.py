"""Real ranks with an impostor on the control port: a process that knows the whole
configuration but not the cluster secret keeps connecting while the group forms and serves."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from mlx_jaccl_cluster.cluster import AUTH_FRAME_MAX, HELLO, PROOF, ChannelClosed, _dumps, recv_frame, send_frame

pytestmark = pytest.mark.slow


def test_an_impostor_cannot_join_learn_or_stall_the_group(tiny_llama, cluster_factory):
    cluster = cluster_factory(tiny_llama, 2)
    host, port = cluster.env["MJC_CONTROL"].rsplit(":", 1)
    stop = threading.Event()
    heard: list[bytes] = []
    attempts = 0

    def impostor():
        nonlocal attempts
        while not stop.is_set():
            try:
                s = socket.create_connection((host, int(port)), timeout=2)
            except OSError:
                stop.wait(0.05)
                continue
            attempts += 1
            try:
                s.settimeout(2)
                heard.append(recv_frame(s, AUTH_FRAME_MAX)[1])
                send_frame(s, PROOF, b"\0" * 64)
                send_frame(s, HELLO, _dumps({"rank": 1, "config": {"world_size": 2}}))
                while True:
                    heard.append(recv_frame(s)[1])
            except (ChannelClosed, OSError):
                pass
            finally:
                s.close()

    threads = [threading.Thread(target=impostor, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        health = cluster.wait_ready()
        assert health["ranks_up"] == 2
        answer = cluster.chat("hello", max_tokens=4)
        assert answer["choices"][0]["message"]["content"]
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert attempts > 5
    assert all(len(h) == 32 for h in heard), [h[:80] for h in heard if len(h) != 32][:3]  # challenges only
    assert httpx.get(cluster.url("/health")).json()["ranks_up"] == 2
    assert "did not prove the cluster secret" in cluster.log(0)
    secret = open(cluster.env["MJC_CLUSTER_SECRET_FILE"]).read().strip()
    assert secret not in cluster.all_logs()
