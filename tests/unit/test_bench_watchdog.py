"""mjc-bench's watchdog: a rank whose process dies, or whose host goes silent, is named by the
survivors, which give up instead of waiting in a collective forever (real TCP on loopback)."""

from __future__ import annotations

import threading
import time

from mlx_jaccl_cluster.bench import LOST_EXIT, Watchdog
from mlx_jaccl_cluster.launch import free_ports


def pair(timeout: float = 5.0):
    """A joined rank 0 and rank 1; each records its exit status instead of leaving the test process."""
    (port,) = free_ports(1)
    exits: dict[int, list[int]] = {0: [], 1: []}
    dogs = [Watchdog(r, 2, f"127.0.0.1:{port}", timeout=timeout, join_timeout=20, exit=exits[r].append) for r in (0, 1)]
    leader = threading.Thread(target=dogs[0].start)
    leader.start()
    dogs[1].start()
    leader.join(20)
    return dogs, exits


def wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_rank_whose_connection_closes_is_named_at_once(capsys):
    dogs, exits = pair()
    assert dogs[0].peers == {1: dogs[0].peers[1]}
    dogs[1].stop()
    dogs[1].conns[0].close()  # what the kernel does to the sockets of a killed process
    started = time.monotonic()
    assert wait(lambda: exits[0] == [LOST_EXIT]), exits
    assert time.monotonic() - started < 5
    assert "lost rank 1" in capsys.readouterr().err


def test_a_silent_rank_is_named_after_the_timeout(capsys):
    dogs, exits = pair(timeout=1.0)
    dogs[1]._stopped.set()  # rank 1's heartbeats stop, its connection stays open: a host gone quiet
    assert wait(lambda: exits[0] == [LOST_EXIT]), exits
    err = capsys.readouterr().err
    assert "rank 1" in err and "sent no heartbeat for 1 s" in err, err


def test_a_rank_that_never_joins_is_named(capsys):
    (port,) = free_ports(1)
    exits: list[int] = []
    Watchdog(0, 3, f"127.0.0.1:{port}", join_timeout=1, exit=exits.append).start()
    assert exits == [LOST_EXIT]
    assert "rank(s) 1, 2 did not join within 1 s" in capsys.readouterr().err


def test_after_stop_a_closed_connection_is_no_loss():
    dogs, exits = pair()
    dogs[0].stop()
    dogs[1].stop()
    time.sleep(2.5)
    assert exits == {0: [], 1: []}


def test_followers_name_the_rank_that_rank_0_lost(capsys):
    """Rank 2 watches only rank 0; when rank 0 loses rank 1 it tells rank 2 who it was."""
    (port,) = free_ports(1)
    exits: dict[int, list[int]] = {0: [], 1: [], 2: []}
    dogs = [Watchdog(r, 3, f"127.0.0.1:{port}", timeout=5, join_timeout=20, exit=exits[r].append) for r in range(3)]
    leader = threading.Thread(target=dogs[0].start)
    leader.start()
    dogs[1].start()
    dogs[2].start()
    leader.join(20)
    dogs[1].stop()
    dogs[1].conns[0].close()
    assert wait(lambda: exits[0] == [LOST_EXIT] and exits[2] == [LOST_EXIT]), exits
    err = capsys.readouterr().err
    assert "rank 2: rank 0 (127.0.0.1) reports: lost rank 1" in err, err
