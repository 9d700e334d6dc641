"""The control channel on its own: rendezvous, rejection, peer filtering, loss detection."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mlx_jaccl_cluster.cluster import (
    HELLO, REJECT, ChannelClosed, Follower, Leader, Rejected, config_mismatch, recv_frame, send_frame, _dumps,
)


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


CONFIG = {"world_size": 2, "model_id": "m"}


class Lost:
    def __init__(self):
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def _pair(interval=0.1, misses=3, config=CONFIG):
    port = _port()
    leader_lost, follower_lost = Lost(), Lost()
    leader = Leader(("127.0.0.1", port), 2, ["127.0.0.1"], CONFIG, heartbeat_interval=interval,
                    heartbeat_misses=misses, on_lost=leader_lost, stats=lambda: {"rank": 0})
    follower = Follower(1, ("127.0.0.1", port), config, heartbeat_interval=interval, heartbeat_misses=misses,
                        on_lost=follower_lost, stats=lambda: {"rss": 123})
    return leader, follower, leader_lost, follower_lost


def _form(leader, follower):
    joined = threading.Thread(target=follower.join)
    joined.start()  # the follower starts first and retries until rank 0 listens
    time.sleep(0.3)
    leader.start()
    leader.wait_for_peers()
    leader.go()
    joined.join(5)
    assert not joined.is_alive()


def test_follower_started_first_joins_and_steps_arrive_in_order():
    leader, follower, leader_lost, follower_lost = _pair()
    _form(leader, follower)
    for i in range(50):
        leader.broadcast_step(str(i).encode())
    assert [follower.next_step() for _ in range(50)] == [str(i).encode() for i in range(50)]
    follower.ready()
    leader.wait_ready()
    time.sleep(0.35)  # a few beats both ways
    view = leader.ranks_view()
    assert view[1]["memory"]["rss"] == 123 and view[0]["memory"] == {"rank": 0}
    assert view[1]["host"] == socket.gethostname() and view[1]["up"] and view[0]["up"]
    assert leader.ranks_up() == 2
    assert not leader_lost.reasons and not follower_lost.reasons


def test_leader_notices_a_silent_follower_within_the_deadline():
    leader, follower, leader_lost, _ = _pair(interval=0.1, misses=3)
    _form(leader, follower)
    follower.live._lost.set()  # stop the follower's beats without closing its socket
    started = time.monotonic()
    assert leader_lost.event.wait(2)
    assert time.monotonic() - started < 0.8
    assert "rank 1" in leader_lost.reasons[0] and "missed heartbeats" in leader_lost.reasons[0]
    assert leader.ranks_up() == 0


def test_follower_notices_rank_0_closing_and_next_step_raises():
    leader, follower, _, follower_lost = _pair()
    _form(leader, follower)
    leader.peers[1].sock.close()
    assert follower_lost.event.wait(2)
    with pytest.raises(ChannelClosed):
        follower.next_step()


def test_mismatched_config_is_rejected_naming_the_field():
    leader, follower, _, _ = _pair(config=CONFIG | {"model_id": "other"})
    leader.start()
    with pytest.raises(Rejected, match="model_id is 'other' on this rank but 'm' on rank 0"):
        follower.join()


def test_connections_from_unconfigured_peers_are_dropped():
    port = _port()
    leader = Leader(("127.0.0.1", port), 2, ["10.9.9.9"], CONFIG, on_lost=Lost())
    leader.start()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(2)
    send_frame(sock, HELLO, _dumps({"rank": 1, "config": CONFIG}))
    with pytest.raises(ChannelClosed):
        recv_frame(sock)
    assert leader.missing_ranks() == [1]


def test_duplicate_and_out_of_range_ranks_are_rejected():
    port = _port()
    leader = Leader(("127.0.0.1", port), 3, ["127.0.0.1"], CONFIG, on_lost=Lost())
    leader.start()

    def hello(rank):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(2)
        send_frame(s, HELLO, _dumps({"rank": rank, "config": CONFIG}))
        return s

    first = hello(1)
    time.sleep(0.2)
    kind, payload = recv_frame(hello(1))
    assert kind == REJECT and b"already connected" in payload
    kind, payload = recv_frame(hello(7))
    assert kind == REJECT and b"not a follower rank" in payload
    first.close()


def test_the_control_channel_binds_only_the_given_address():
    port = _port()
    leader = Leader(("127.0.0.1", port), 2, ["127.0.0.1"], CONFIG, on_lost=Lost())
    leader.start()
    assert leader._server.getsockname()[0] == "127.0.0.1"


def test_config_mismatch_names_nothing_when_equal():
    assert config_mismatch({"a": 1}, {"a": 1}) is None
    assert "b is 2 on this rank but None on rank 0" == config_mismatch({"a": 1}, {"a": 1, "b": 2})
