"""The control channel the ranks use beside the MLX group.

One TCP connection from every follower rank to rank 0 (the leader), bound to the cluster
address and open only to the configured peers. It carries, in order:

0. **Authentication.** Before anything else both ends prove they hold the cluster
   secret, without sending it: rank 0 sends a random challenge, the follower answers with
   its own challenge and an HMAC-SHA256 of both under the secret, and rank 0 answers the
   follower's challenge the same way (each proof is tagged with its role, so neither can
   be reflected). A peer that fails is closed with no word of why; it never sees the
   configuration. Until then frames are at most ``AUTH_FRAME_MAX`` bytes and a connection
   has ``HANDSHAKE_TIMEOUT`` s; at most ``pending_limit`` connections may be mid-handshake
   (the oldest is dropped for a new one), so a flood of connections neither grows threads
   without bound nor keeps a real rank out for long.
1. **Rendezvous.** Followers connect (retrying, in any order, minutes apart) and say
   HELLO with their rank and configuration. Rank 0 rejects a mismatch with a message
   that names the field (an authenticated peer is one of ours: it may know). When every
   rank is present rank 0 sends GO and all ranks call ``mx.distributed.init`` at once,
   so MLX's own connect back-off never stalls start-up.
2. **Readiness.** Each follower sends READY after loading its shard (or FAIL with the
   reason, which rank 0 reports).
3. **Heartbeats** both ways every ``heartbeat_interval`` seconds, carrying each rank's
   memory figures (rank 0 keeps each follower's last ones for ``/metrics`` and the dashboard). A rank silent for ``heartbeat_misses`` intervals, or whose socket
   closes, is lost: ``on_lost`` runs once. Liveness never comes from the MLX group,
   where a rank waiting for a dead peer spins and looks busy.
4. **Steps.** Rank 0 sends one STEP frame before each generation step: what to insert
   and remove (empty when nothing changed). Followers apply exactly these, in order, so
   every rank runs the same sequence of steps. While idle, a STEP frame may instead name
   one step of the link probe, which every rank then runs at the same point. A follower
   reads STEP frames on its engine thread itself (``Follower.next_step``): handing each
   one over from a reader thread cost 13 % of decode speed at 2 ranks (waking a second
   thread every step). While the engine thread is busy elsewhere, the heartbeat thread
   reads whatever rank 0 sent (keeping STEP frames for the engine, in order), so liveness
   never depends on the engine thread coming back.

Frames (``encode_frame`` / ``recv_frame``, the one place their layout is written) are
``>BI`` (kind, length) and the body. The handshake's two frames (CHALLENGE, PROOF) are
bare; every frame after it, both ways, is **sealed** (``Seal``): its body is an 8-byte
sequence number (its own counter per direction, from 0), the payload, and a 16-byte tag,
HMAC-SHA256 truncated, over header, sequence and payload, under a key of this connection
and direction derived from the secret and both challenges. A frame whose tag is wrong
(forged, altered, from another connection or the other direction), whose sequence is not
the next one (replayed, reordered, dropped) or whose length is over the limit is refused
(``FrameRefused``): the receiver drops the connection and treats the peer as lost. Each
read states the largest payload it accepts (``AUTH_FRAME_MAX`` before authentication,
``HELLO_FRAME_MAX`` for HELLO, ``MAX_FRAME`` after). Frames are not encrypted: prompts
cross the control link in clear (docs/runtime.md, "Security"). No MLX here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .generation import Step
from .settings import Settings

log = logging.getLogger("mjc.cluster")

HELLO, REJECT, GO, READY, FAIL, BEAT, STEP, CHALLENGE, PROOF = range(1, 10)
_HEADER = struct.Struct(">BI")  # kind, body length
_SEQ = struct.Struct(">Q")  # a sealed frame's sequence number
TAG_BYTES = 16  # HMAC-SHA256 truncated to 128 bits: a forger gets one guess per connection
MAX_FRAME = 64 << 20  # a STEP frame with a full batch of long prompts is a few MB
HELLO_FRAME_MAX = 64 << 10
AUTH_FRAME_MAX = 256
HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to authenticate and say HELLO
NONCE_BYTES = 32


class ChannelClosed(Exception):
    """The other end went away."""


class Rejected(Exception):
    """Rank 0 refused this rank; the message says why."""


class AuthFailed(Exception):
    """The other end does not hold the cluster secret (or said something else)."""


class FrameRefused(ChannelClosed):
    """A frame failed its check (tag, sequence or length); the connection is dropped."""


class Seal:
    """The signing of one authenticated connection's frames, from one end's side.

    Each direction has its own key, HMAC(secret, label | direction | both challenges), so
    a frame is good on this connection and in this direction only, and its own sequence
    counter, so a replayed or reordered frame is refused even with a good tag. Not
    thread-safe: the callers already serialise sends (a send lock) and reads (one reader).
    """

    def __init__(self, secret: bytes, role: bytes, leader_nonce: bytes, follower_nonce: bytes):
        other = b"follower" if role == b"leader" else b"leader"
        self._send = hmac.new(_derive(secret, role, leader_nonce, follower_nonce), digestmod=hashlib.sha256)
        self._recv = hmac.new(_derive(secret, other, leader_nonce, follower_nonce), digestmod=hashlib.sha256)
        self.sent = 0  # sequence number of the next frame sent
        self.received = 0  # sequence number the next frame read must carry

    @staticmethod
    def _tag(mac: hmac.HMAC, head: bytes, payload: bytes) -> bytes:
        h = mac.copy()  # the keyed state, copied: no per-frame key setup
        h.update(head)
        h.update(payload)
        return h.digest()[:TAG_BYTES]

    def seal(self, kind: int, payload: bytes) -> bytes:
        """The whole frame: header, sequence, payload, tag."""
        head = _HEADER.pack(kind, _SEQ.size + len(payload) + TAG_BYTES) + _SEQ.pack(self.sent)
        self.sent += 1
        return head + payload + self._tag(self._send, head, payload)

    def open(self, header: bytes, body: bytes) -> bytes:
        """The payload of a sealed frame whose header and body were read; FrameRefused if
        its tag is wrong or its sequence is not the next one."""
        if len(body) < _SEQ.size + TAG_BYTES:
            raise FrameRefused(f"a frame of {len(body)} bytes cannot hold a sequence number and tag")
        head, payload, tag = header + body[: _SEQ.size], body[_SEQ.size : -TAG_BYTES], body[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(self._recv, head, payload)):
            raise FrameRefused("bad tag: the frame was forged, altered, or signed for another connection")
        (seq,) = _SEQ.unpack(body[: _SEQ.size])
        if seq != self.received:
            raise FrameRefused(f"sequence {seq} where {self.received} was due: a replayed or reordered frame")
        self.received += 1
        return payload


def _derive(secret: bytes, sender: bytes, leader_nonce: bytes, follower_nonce: bytes) -> bytes:
    """The key of the frames ``sender`` sends on the connection of these two challenges."""
    label = b"mjc-control-v1|frames|" + sender + b"|"
    return hmac.new(secret, label + leader_nonce + follower_nonce, hashlib.sha256).digest()


def encode_frame(kind: int, payload: bytes = b"", seal: Seal | None = None) -> bytes:
    """One frame as it goes on the wire: bare (the handshake) or sealed (everything after)."""
    return seal.seal(kind, payload) if seal is not None else _HEADER.pack(kind, len(payload)) + payload


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"", seal: Seal | None = None) -> None:
    sock.sendall(encode_frame(kind, payload, seal))


def _proof(secret: bytes, role: bytes, leader_nonce: bytes, follower_nonce: bytes) -> bytes:
    return hmac.new(secret, b"mjc-control-v1|" + role + b"|" + leader_nonce + follower_nonce, hashlib.sha256).digest()


def _expect(sock: socket.socket, kind: int, size: int) -> bytes:
    got, payload = recv_frame(sock, AUTH_FRAME_MAX)
    if got != kind or len(payload) != size:
        raise AuthFailed(f"expected frame {kind} of {size} bytes, got frame {got} of {len(payload)}")
    return payload


def prove_to_follower(sock: socket.socket, secret: bytes) -> Seal:
    """Rank 0's half of the handshake; AuthFailed if the peer cannot prove the secret.
    Returns the seal of every frame after it."""
    mine = os.urandom(NONCE_BYTES)
    send_frame(sock, CHALLENGE, mine)
    answer = _expect(sock, PROOF, NONCE_BYTES + 32)
    theirs, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _proof(secret, b"follower", mine, theirs)):
        raise AuthFailed("wrong proof of the cluster secret")
    send_frame(sock, PROOF, _proof(secret, b"leader", mine, theirs))
    return Seal(secret, b"leader", mine, theirs)


def prove_to_leader(sock: socket.socket, secret: bytes) -> Seal:
    """A follower's half of the handshake; AuthFailed if rank 0 cannot prove the secret.
    Returns the seal of every frame after it."""
    theirs = _expect(sock, CHALLENGE, NONCE_BYTES)
    mine = os.urandom(NONCE_BYTES)
    send_frame(sock, PROOF, mine + _proof(secret, b"follower", theirs, mine))
    if not hmac.compare_digest(_expect(sock, PROOF, 32), _proof(secret, b"leader", theirs, mine)):
        raise AuthFailed("wrong proof of the cluster secret")
    return Seal(secret, b"follower", theirs, mine)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        try:
            chunk = sock.recv(n)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not chunk:
            raise ChannelClosed("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME, seal: Seal | None = None) -> tuple[int, bytes]:
    """The next frame's kind and payload (at most ``limit`` bytes): bare, or checked and
    opened with ``seal``. FrameRefused when it fails a check, ChannelClosed at the end."""
    header = _recv_exact(sock, _HEADER.size)
    kind, length = _HEADER.unpack(header)
    overhead = 0 if seal is None else _SEQ.size + TAG_BYTES
    if length > limit + overhead:
        raise FrameRefused(f"frame of {length - overhead} bytes is larger than the {limit} allowed here")
    body = _recv_exact(sock, length) if length else b""
    return kind, body if seal is None else seal.open(header, body)


def _drop(sock: socket.socket) -> None:
    """Close ``sock`` now, waking any thread blocked reading it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def config_mismatch(mine: dict, theirs: dict) -> str | None:
    """Name the first configuration field on which two ranks disagree, or None."""
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            return f"{key} is {theirs.get(key)!r} on this rank but {mine.get(key)!r} on rank 0"
    return None


@dataclass
class PeerInfo:
    """What rank 0 knows about one follower."""

    rank: int
    address: str
    sock: socket.socket
    host: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    stats: dict = field(default_factory=dict)
    ready: bool = False
    seal: Seal | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, kind: int, payload: bytes = b"") -> None:
        with self.send_lock:
            send_frame(self.sock, kind, payload, self.seal)


class _Liveness:
    """Shared by both ends: the once-only loss callback and the heartbeat timing."""

    def __init__(self, interval: float, misses: int, on_lost: Callable[[str], None]):
        self.interval = interval
        self.deadline = interval * misses
        self._on_lost = on_lost
        self._lost = threading.Event()
        self._lost_lock = threading.Lock()
        self.lost_reason: str | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout: float) -> bool:
        """True once the group is lost, waiting at most ``timeout`` s for it."""
        return self._lost.wait(timeout)

    def lose(self, reason: str) -> None:
        with self._lost_lock:
            if self._lost.is_set():
                return
            self.lost_reason = reason
            self._lost.set()
        log.error("cluster lost: %s", reason)
        self._on_lost(reason)

    def run_every_interval(self, tick: Callable[[], None], name: str) -> None:
        def loop() -> None:
            while not self._lost.wait(self.interval):
                tick()

        threading.Thread(target=loop, name=name, daemon=True).start()


class Leader:
    """Rank 0's end: accepts followers, sends GO, beats, STEP frames."""

    def __init__(
        self,
        bind: tuple[str, int],
        world_size: int,
        allowed_ips: list[str],
        config: dict,
        *,
        secret: bytes,
        heartbeat_interval: float = Settings.default("heartbeat_interval"),
        heartbeat_misses: int = Settings.default("heartbeat_misses"),
        stats: Callable[[], dict] = dict,
        on_lost: Callable[[str], None],
        log_every: float = Settings.default("rendezvous_log_every"),
        pending_limit: int | None = None,
    ):
        self.bind = bind
        self.secret = secret
        # connections mid-handshake at once: every follower twice over, and a few more
        self.pending_limit = pending_limit or 2 * world_size + 4
        self._pending: dict[socket.socket, float] = {}  # socket -> when it was accepted
        self.world_size = world_size
        self.allowed_ips = set(allowed_ips)
        self.config = config
        self.stats = stats
        self.log_every = log_every
        self.live = _Liveness(heartbeat_interval, heartbeat_misses, on_lost)
        self.peers: dict[int, PeerInfo] = {}
        self._lock = threading.Condition()
        self._formed = False
        self._fail: str | None = None
        self._server: socket.socket | None = None

    # --- rendezvous --------------------------------------------------------------
    def start(self) -> None:
        server = socket.create_server(self.bind, reuse_port=False)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server = server
        threading.Thread(target=self._accept_loop, name="mjc-accept", daemon=True).start()
        log.info("control channel listening on %s:%d for %d follower(s)", *self.bind, self.world_size - 1)

    def _accept_loop(self) -> None:
        assert self._server is not None
        while True:
            try:
                sock, addr = self._server.accept()
            except OSError:
                return
            ip = addr[0]
            if ip not in self.allowed_ips:
                log.warning(
                    "refused control connection from %s: not a configured peer %s", ip, sorted(self.allowed_ips)
                )
                sock.close()
                continue
            self._hold(sock)
            threading.Thread(target=self._admit, args=(sock, ip), name="mjc-admit", daemon=True).start()

    def _hold(self, sock: socket.socket) -> None:
        """Count ``sock`` as mid-handshake, first dropping expired ones and, when full, the oldest."""
        now = time.monotonic()
        with self._lock:
            expired = [s for s, t in self._pending.items() if now - t > HANDSHAKE_TIMEOUT]
            while len(self._pending) - len(expired) >= self.pending_limit:
                oldest = min((s for s in self._pending if s not in expired), key=self._pending.__getitem__)
                expired.append(oldest)
            for s in expired:
                self._pending.pop(s, None)
            self._pending[sock] = now
        if expired:
            log.warning(
                "dropped %d control connection(s) still mid-handshake (limit %d, %.0f s each)",
                len(expired),
                self.pending_limit,
                HANDSHAKE_TIMEOUT,
            )
        for s in expired:
            _drop(s)

    def _release(self, sock: socket.socket) -> bool:
        """Leave the handshake; False if the connection was dropped meanwhile."""
        with self._lock:
            return self._pending.pop(sock, None) is not None

    def _admit(self, sock: socket.socket, ip: str) -> None:
        _tune(sock)
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            seal = prove_to_follower(sock, self.secret)
        except (AuthFailed, ChannelClosed, OSError) as exc:
            log.warning("dropped control connection from %s: it did not prove the cluster secret (%s)", ip, exc)
            self._release(sock)
            _drop(sock)
            return
        why = "no HELLO in time"
        try:
            kind, payload = recv_frame(sock, HELLO_FRAME_MAX, seal)
            hello = json.loads(payload) if kind == HELLO else None
        except FrameRefused as exc:
            hello, why = None, f"refused its HELLO frame: {exc}"
        except (ChannelClosed, OSError, ValueError):
            hello = None
        if not self._release(sock) or not isinstance(hello, dict) or not isinstance(hello.get("rank"), int):
            log.warning("dropped control connection from %s: %s", ip, why if hello is None else "invalid HELLO")
            _drop(sock)
            return
        sock.settimeout(None)
        rank = hello["rank"]
        reason = self._check_hello(rank, hello.get("config", {}))
        if reason:
            log.error("rejected rank %s from %s: %s", rank, ip, reason)
            try:
                send_frame(sock, REJECT, reason.encode(), seal)
            finally:
                sock.close()
            return
        peer = PeerInfo(rank=rank, address=ip, sock=sock, host=str(hello.get("host") or ip), seal=seal)
        with self._lock:
            self.peers[rank] = peer
            self._lock.notify_all()
        log.info("rank %d joined from %s (%d/%d)", rank, ip, len(self.peers) + 1, self.world_size)
        threading.Thread(target=self._read_loop, args=(peer,), name=f"mjc-read-{rank}", daemon=True).start()

    def _check_hello(self, rank: int, config: dict) -> str | None:
        if not 0 < rank < self.world_size:
            return f"rank {rank} is not a follower rank of this group (1..{self.world_size - 1})"
        mismatch = config_mismatch(self.config, config)
        if mismatch:
            return f"configuration differs from rank 0: {mismatch}; re-render the rank files from one inventory"
        with self._lock:
            if self._formed:
                return "the group is already formed; restart every rank to form a new one"
            if rank in self.peers:
                return f"rank {rank} is already connected from {self.peers[rank].address}"
        return None

    def wait_for_peers(self) -> None:
        """Block until every follower has said HELLO, logging who is missing."""
        with self._lock:
            while len(self.peers) < self.world_size - 1:
                if not self._lock.wait(self.log_every):
                    log.info("waiting for rank(s) %s to connect to %s:%d", self.missing_ranks(), *self.bind)

    def missing_ranks(self) -> list[int]:
        with self._lock:
            return sorted(set(range(1, self.world_size)) - set(self.peers))

    def go(self) -> None:
        """Seal the group and tell every follower to join the MLX group now."""
        with self._lock:
            self._formed = True
            peers = list(self.peers.values())
        now = time.monotonic()
        for peer in peers:
            peer.last_seen = now
            peer.send(GO)
        self.live.run_every_interval(self._beat, "mjc-beat")

    def wait_ready(self) -> None:
        """Block until every follower loaded its shard; raise with its reason if one failed."""
        with self._lock:
            while not all(p.ready for p in self.peers.values()) and self._fail is None and not self.live.lost:
                self._lock.wait(1.0)
            if self._fail is not None:
                raise RuntimeError(self._fail)
            if self.live.lost:
                raise RuntimeError(self.live.lost_reason or "a rank was lost")

    # --- running -----------------------------------------------------------------
    def _read_loop(self, peer: PeerInfo) -> None:
        try:
            while True:
                kind, payload = recv_frame(peer.sock, seal=peer.seal)
                peer.last_seen = time.monotonic()
                if kind == BEAT:
                    peer.stats = json.loads(payload) if payload else {}
                elif kind == READY:
                    with self._lock:
                        peer.ready = True
                        self._lock.notify_all()
                elif kind == FAIL:
                    with self._lock:
                        self._fail = f"rank {peer.rank} failed: {payload.decode(errors='replace')}"
                        self._lock.notify_all()
                    self.live.lose(self._fail)
                    return
        except ChannelClosed as exc:
            _drop(peer.sock)
            with self._lock:
                formed = self._formed
                if not formed and self.peers.get(peer.rank) is peer:
                    del self.peers[peer.rank]
            if isinstance(exc, FrameRefused):
                what = f"refused a frame from rank {peer.rank} ({peer.address}) and dropped its connection: {exc}"
            else:
                what = f"rank {peer.rank} ({peer.address}) disconnected: {exc}"
            if formed:
                self.live.lose(what)
            else:
                log.warning("%s; waiting for rank %d again", what, peer.rank)

    def _beat(self) -> None:
        payload = _dumps(self.stats())
        now = time.monotonic()
        for peer in list(self.peers.values()):
            silent = now - peer.last_seen
            if silent > self.live.deadline:
                self.live.lose(f"rank {peer.rank} ({peer.address}) missed heartbeats for {silent:.1f} s")
                return
            try:
                peer.send(BEAT, payload)
            except OSError as exc:
                self.live.lose(f"rank {peer.rank} ({peer.address}) unreachable: {exc}")
                return

    def broadcast_step(self, step: Step) -> None:
        """Send one STEP frame to every follower (called by the engine thread)."""
        payload = step.to_wire()
        for peer in self.peers.values():
            try:
                peer.send(STEP, payload)
            except OSError as exc:
                self.live.lose(f"rank {peer.rank} ({peer.address}) unreachable: {exc}")
                raise ChannelClosed(str(exc)) from None

    def ranks_up(self) -> int:
        if self.live.lost:
            return 0
        return 1 + sum(1 for p in self.peers.values() if p.ready or not self._formed)

    def ranks_view(self) -> dict[int, dict]:
        """Every rank as rank 0 sees it: host, address, up, seconds since its last frame,
        and the memory figures of its last heartbeat (rank 0's own are read now)."""
        now = time.monotonic()
        up = not self.live.lost
        view = {
            0: {
                "host": socket.gethostname(),
                "address": self.bind[0],
                "up": up,
                "silent_s": 0.0,
                "memory": self.stats(),
            }
        }
        for rank, p in sorted(self.peers.items()):
            silent = now - p.last_seen
            view[rank] = {
                "host": p.host,
                "address": p.address,
                "silent_s": round(silent, 3),
                "memory": dict(p.stats),
                "up": up and p.ready and silent <= self.live.deadline,
            }
        return view


class Follower:
    """A follower rank's end: joins rank 0, beats, receives STEP frames."""

    def __init__(
        self,
        rank: int,
        control: tuple[str, int],
        config: dict,
        *,
        secret: bytes,
        heartbeat_interval: float = Settings.default("heartbeat_interval"),
        heartbeat_misses: int = Settings.default("heartbeat_misses"),
        stats: Callable[[], dict] = dict,
        on_lost: Callable[[str], None],
        log_every: float = Settings.default("rendezvous_log_every"),
    ):
        self.rank = rank
        self.control = control
        self.secret = secret
        self.config = config
        self.stats = stats
        self.log_every = log_every
        self.live = _Liveness(heartbeat_interval, heartbeat_misses, on_lost)
        #: STEP payloads the heartbeat thread read while the engine thread was busy
        self._steps: deque[bytes] = deque()
        #: held by whichever thread reads the socket (the engine thread, or the heartbeat's drain)
        self._read_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._seal: Seal | None = None
        self._send_lock = threading.Lock()
        self._last_seen = time.monotonic()

    def join(self) -> None:
        """Connect to rank 0 (retrying until it is up) and return once it says GO."""
        started = last_log = time.monotonic()
        while True:
            try:
                sock = socket.create_connection(self.control, timeout=5.0)
            except OSError as exc:
                now = time.monotonic()
                if now - last_log >= self.log_every:
                    log.info("waiting for rank 0 at %s:%d (%s, %.0f s so far)", *self.control, exc, now - started)
                    last_log = now
                time.sleep(0.25)
                continue
            _tune(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            try:
                seal = prove_to_leader(sock, self.secret)
            except (AuthFailed, ChannelClosed, OSError) as exc:
                now = time.monotonic()
                if now - last_log >= self.log_every or isinstance(exc, AuthFailed):
                    log.warning(
                        "the process at %s:%d did not prove the cluster secret (%s): not rank 0 of this "
                        "cluster, or a different MJC_CLUSTER_SECRET_FILE; retrying",
                        *self.control,
                        exc,
                    )
                    last_log = now
                _drop(sock)
                time.sleep(1.0)
                continue
            sock.settimeout(None)
            try:
                hello = {"rank": self.rank, "config": self.config, "host": socket.gethostname()}
                send_frame(sock, HELLO, _dumps(hello), seal)
                kind, payload = recv_frame(sock, seal=seal)
            except FrameRefused as exc:
                log.warning("refused a frame from rank 0 at %s during rendezvous (%s); reconnecting", self._peer, exc)
                _drop(sock)
                time.sleep(0.5)
                continue
            except (ChannelClosed, OSError) as exc:
                log.info("rank 0 closed the connection during rendezvous (%s); retrying", exc)
                sock.close()
                time.sleep(0.5)
                continue
            if kind == REJECT:
                sock.close()
                raise Rejected(payload.decode(errors="replace"))
            if kind != GO:
                sock.close()
                raise Rejected(f"unexpected frame {kind} from rank 0 during rendezvous")
            self._sock, self._seal = sock, seal
            self._last_seen = time.monotonic()
            self.live.run_every_interval(self._beat, "mjc-beat")
            log.info("rank %d joined the group at %s:%d", self.rank, *self.control)
            return

    def _send(self, kind: int, payload: bytes = b"") -> None:
        assert self._sock is not None
        with self._send_lock:
            send_frame(self._sock, kind, payload, self._seal)

    def ready(self) -> None:
        self._send(READY)

    def fail(self, reason: str) -> None:
        try:
            self._send(FAIL, reason.encode())
        except OSError:
            pass

    @property
    def _peer(self) -> str:
        return f"{self.control[0]}:{self.control[1]}"

    def _read_failed(self, exc: Exception) -> None:
        """Reading from rank 0 failed: a refused frame or a closed socket; lose rank 0, once."""
        if isinstance(exc, FrameRefused):
            self._lose(f"refused a frame from rank 0 at {self._peer} and dropped the connection: {exc}")
        else:
            self._lose(f"rank 0 {self._peer} disconnected: {exc}")

    def _lose(self, reason: str) -> None:
        """Rank 0 is gone: report it once and close the socket, which wakes an engine
        thread blocked reading it (``next_step`` then raises ChannelClosed)."""
        self.live.lose(reason)
        if self._sock is not None:
            _drop(self._sock)

    def _drain(self) -> None:
        """Read every frame rank 0 has sent so far (the caller holds the read lock): STEP
        payloads are kept for ``next_step``, every frame counts as rank 0 being alive. A
        frame that starts but does not finish within the heartbeat deadline is a loss."""
        assert self._sock is not None
        while select.select([self._sock], [], [], 0)[0]:
            self._sock.settimeout(self.live.deadline)
            try:
                kind, payload = recv_frame(self._sock, seal=self._seal)
            finally:
                self._sock.settimeout(None)
            self._last_seen = time.monotonic()
            if kind == STEP:
                self._steps.append(payload)

    def _beat(self) -> None:
        # The engine thread reads the socket whenever it waits for a step; if it has not
        # for a while (a long step, loading the model) and is not reading now, read here.
        if time.monotonic() - self._last_seen > self.live.interval and self._read_lock.acquire(blocking=False):
            try:
                self._drain()
            except (ChannelClosed, OSError, ValueError) as exc:
                self._read_failed(exc)
                return
            finally:
                self._read_lock.release()
        silent = time.monotonic() - self._last_seen
        if silent > self.live.deadline:
            self._lose(f"rank 0 missed heartbeats for {silent:.1f} s")
            return
        try:
            self._send(BEAT, _dumps(self.stats()))
        except OSError as exc:
            self._lose(f"rank 0 unreachable: {exc}")

    def next_step(self) -> Step:
        """The next STEP frame from rank 0, read on the calling (engine) thread: frames in
        between (heartbeats) count as liveness. Raises ChannelClosed once rank 0 is lost."""
        assert self._sock is not None
        with self._read_lock:
            while True:
                if self._steps:
                    return Step.from_wire(self._steps.popleft())
                if self.live.lost:
                    raise ChannelClosed(self.live.lost_reason or "rank 0 lost")
                try:
                    kind, payload = recv_frame(self._sock, seal=self._seal)
                except ChannelClosed as exc:
                    self._read_failed(exc)
                    raise ChannelClosed(self.live.lost_reason or str(exc)) from None
                self._last_seen = time.monotonic()
                if kind == STEP:
                    return Step.from_wire(payload)
