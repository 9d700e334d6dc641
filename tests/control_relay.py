"""A man in the middle of the control channel, for the tests: a TCP relay between one
follower and rank 0 that sees every byte (it relays the handshake honestly, so it knows
both challenges, the configuration and every frame) but not the cluster secret, and that
tampers with the stream on demand: inject, replay, alter, reorder or oversize a frame.

It reads frames by their header only (``>BI``: kind, body length), so it needs nothing
from the code under test but the frame kinds; what a tampered frame does to the receiver
is the test's to check."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

HEADER = struct.Struct(">BI")

#: a tamper hook: (direction, raw frame) -> the raw frames to pass on instead
Tamper = Callable[[str, bytes], list[bytes]]

TO_FOLLOWER, TO_LEADER = "to_follower", "to_leader"


class Lost:
    """An ``on_lost`` callback that records why a channel lost its peer, and when."""

    def __init__(self):
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def _read_frame(sock: socket.socket) -> bytes | None:
    def exact(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    head = exact(HEADER.size)
    if head is None:
        return None
    _, length = HEADER.unpack(head)
    body = exact(length) if length else b""
    return None if body is None else head + body


class Relay:
    """Listens on a loopback port; each connection a follower makes is relayed to ``upstream``."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        #: every raw frame seen, by direction, in order (the captures a replay uses)
        self.seen: dict[str, list[bytes]] = {TO_FOLLOWER: [], TO_LEADER: []}
        self.tamper: Tamper | None = None
        self.closed = threading.Event()  # set once either side of a relayed connection ends
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def frames(self, direction: str, kind: int) -> list[bytes]:
        with self._lock:
            return [f for f in self.seen[direction] if f[0] == kind]

    def inject(self, direction: str, raw: bytes) -> None:
        """Send ``raw`` now, between whole frames (the relay's lock is held while it forwards one)."""
        with self._lock:
            self._out[direction].sendall(raw)

    def _accept(self) -> None:
        while True:
            try:
                follower, _ = self.server.accept()
            except OSError:
                return
            try:
                leader = socket.create_connection(self.upstream)
            except OSError:  # rank 0 not listening yet: the follower retries, as it would
                follower.close()
                continue
            self._socks += [follower, leader]
            self._out = {TO_FOLLOWER: follower, TO_LEADER: leader}
            for src, dst, direction in ((leader, follower, TO_FOLLOWER), (follower, leader, TO_LEADER)):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while (raw := _read_frame(src)) is not None:
                with self._lock:
                    self.seen[direction].append(raw)
                    out = self.tamper(direction, raw) if self.tamper else [raw]
                    for frame in out:
                        dst.sendall(frame)
        except OSError:
            pass
        self.closed.set()
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()
        for s in self._socks:
            s.close()
