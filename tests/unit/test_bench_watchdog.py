"""mjc-bench's watchdog: a rank whose process dies, or whose host goes silent, is named by the
survivors, which give up instead of waiting in a collective forever (real TCP on loopback);
a process without the cluster secret can neither join the sweep nor end it."""

from __future__ import annotations

import socket
import threading
import time

from mlx_jaccl_cluster.bench import LOST_EXIT, Watchdog
from mlx_jaccl_cluster.launch import free_ports

SECRET = b"the-cluster-secret-0123456789"


def pair(timeout: float = 5.0):
    """A joined rank 0 and rank 1; each records its exit status instead of leaving the test process."""
    (port,) = free_ports(1)
    exits: dict[int, list[int]] = {0: [], 1: []}
    dogs = [
        Watchdog(r, 2, f"127.0.0.1:{port}", timeout=timeout, join_timeout=20, exit=exits[r].append, secret=SECRET)
        for r in (0, 1)
    ]
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
    Watchdog(0, 3, f"127.0.0.1:{port}", join_timeout=1, exit=exits.append, secret=SECRET).start()
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
    dogs = [
        Watchdog(r, 3, f"127.0.0.1:{port}", timeout=5, join_timeout=20, exit=exits[r].append, secret=SECRET)
        for r in range(3)
    ]
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


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_process_without_the_secret_cannot_join_or_end_the_sweep(capsys):
    """It connects first and says what a rank says; rank 0 drops it and waits for the real
    rank 1, and the impostor closing its connection is no loss."""
    (port,) = free_ports(1)
    exits: dict[int, list[int]] = {0: [], 1: []}
    dogs = [
        Watchdog(r, 2, f"127.0.0.1:{port}", timeout=5, join_timeout=20, exit=exits[r].append, secret=SECRET)
        for r in (0, 1)
    ]
    leader = threading.Thread(target=dogs[0].start)
    leader.start()
    impostor = Watchdog(1, 2, f"127.0.0.1:{port}", join_timeout=2, exit=lambda _: None, secret=b"a-guess-" * 4)
    assert wait(lambda: _listening(port))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)  # the old protocol: a line, then beats
    raw.sendall(b"1 impostor\n" + b"." * 16)
    impostor.start()  # the handshake with a wrong secret: refused, it gives up after its join timeout
    dogs[1].start()
    leader.join(20)
    assert dogs[0].peers == {1: socket.gethostname()}
    raw.close()
    time.sleep(1.5)
    assert exits == {0: [], 1: []}
    err = capsys.readouterr().err
    assert "dropped a watchdog connection from 127.0.0.1" in err
    dogs[0].stop()
    dogs[1].stop()


def test_a_connection_from_an_unconfigured_address_is_refused(capsys):
    (port,) = free_ports(1)
    exits: list[int] = []
    leader = Watchdog(
        0, 2, f"127.0.0.1:{port}", join_timeout=2, exit=exits.append, secret=SECRET, allowed_ips=["10.9.9.9"]
    )
    t = threading.Thread(target=leader.start)
    t.start()
    Watchdog(1, 2, f"127.0.0.1:{port}", join_timeout=2, exit=lambda _: None, secret=SECRET).start()
    t.join(10)
    assert exits == [LOST_EXIT]
    err = capsys.readouterr().err
    assert "refused a watchdog connection from 127.0.0.1: not a configured peer" in err
    assert "rank(s) 1 did not join within 2 s" in err
