"""Every control frame after the handshake is sealed (sequence number and HMAC tag under a
per-connection key): a man in the middle who relays the handshake honestly, and so knows
both challenges, the configuration and every frame, but not the secret, cannot change
what a follower runs. Whatever it injects, replays, alters, reorders or oversizes is
refused, the connection is dropped, and the rank that refused it names the peer."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
from control_relay import TO_FOLLOWER, TO_LEADER, Lost, Relay

from mlx_jaccl_cluster.cluster import (
    _HEADER,
    BEAT,
    CHALLENGE,
    FAIL,
    HELLO,
    MAX_FRAME,
    PROOF,
    STEP,
    TAG_BYTES,
    ChannelClosed,
    Follower,
    FrameRefused,
    Leader,
    Seal,
    encode_frame,
)
from mlx_jaccl_cluster.generation import Step

SECRET = b"the-cluster-secret-0123456789"
CONFIG = {"world_size": 2, "model_id": "m"}


# --- the seal on its own -------------------------------------------------------------
def _seals(secret_a: bytes = SECRET, secret_b: bytes = SECRET) -> tuple[Seal, Seal]:
    """Rank 0's and a follower's seals of one connection (the same two challenges)."""
    ln, fn = os.urandom(32), os.urandom(32)
    return Seal(secret_a, b"leader", ln, fn), Seal(secret_b, b"follower", ln, fn)


def _open(seal: Seal, raw: bytes) -> bytes:
    return seal.open(raw[: _HEADER.size], raw[_HEADER.size :])


def test_sealed_frames_open_in_order_on_the_other_end():
    leader, follower = _seals()
    for i in range(3):
        assert _open(follower, encode_frame(STEP, b'{"c":%d}' % i, leader)) == b'{"c":%d}' % i
        assert _open(leader, encode_frame(BEAT, b"{}", follower)) == b"{}"
    assert _open(follower, encode_frame(BEAT, b"", leader)) == b""  # an empty payload is sealed too


def test_changing_any_byte_of_a_sealed_frame_is_refused():
    leader, follower = _seals()
    raw = encode_frame(STEP, Step(checksum=7, removes=(1, 2)).to_wire(), leader)
    for at in range(len(raw)):
        bad = bytearray(raw)
        bad[at] ^= 0x01
        with pytest.raises(FrameRefused):
            _open(follower, bytes(bad))
    assert _open(follower, raw)  # the intact frame still opens: refusals did not move the sequence


def test_replayed_and_reordered_frames_are_refused():
    leader, follower = _seals()
    first, second, third = (encode_frame(STEP, b"{}", leader) for _ in range(3))
    _open(follower, first)
    with pytest.raises(FrameRefused, match="sequence 0 where 1 was due: a replayed or reordered frame"):
        _open(follower, first)
    with pytest.raises(FrameRefused, match="sequence 2 where 1 was due"):
        _open(follower, third)
    _open(follower, second)


def test_a_frame_for_another_direction_connection_or_secret_is_refused():
    leader, follower = _seals()
    with pytest.raises(FrameRefused, match="bad tag"):  # reflected: a follower's frame sent back to it
        _open(follower, encode_frame(BEAT, b"{}", follower))
    _, other_follower = _seals()
    with pytest.raises(FrameRefused, match="bad tag"):  # captured on another connection
        _open(other_follower, encode_frame(STEP, b"{}", leader))
    forger, follower = _seals(b"not-the-cluster-secret-000000", SECRET)
    with pytest.raises(FrameRefused, match="bad tag"):  # same challenges, same sequence, wrong secret
        _open(follower, encode_frame(STEP, b"{}", forger))
    with pytest.raises(FrameRefused, match="cannot hold"):  # a bare frame where a sealed one is due
        _open(follower, encode_frame(STEP, b"{}"))


# --- a man in the middle on a real connection ----------------------------------------
@pytest.fixture
def relayed():
    """Rank 0, a relay in the middle, and a follower that connects to the relay; the group
    is formed through it. Yields (leader, follower, relay, leader_lost, follower_lost)."""
    leader_lost, follower_lost = Lost(), Lost()
    beat = dict(heartbeat_interval=0.5, heartbeat_misses=10)  # a loaded machine never misses: the refusal is the loss
    leader = Leader(("127.0.0.1", 0), 2, ["127.0.0.1"], CONFIG, secret=SECRET, on_lost=leader_lost, **beat)
    leader.start()
    assert leader._server is not None
    relay = Relay(leader._server.getsockname())
    follower = Follower(1, relay.address, CONFIG, secret=SECRET, on_lost=follower_lost, **beat)
    joined = threading.Thread(target=follower.join, daemon=True)
    joined.start()
    leader.wait_for_peers()
    leader.go()
    joined.join(10)
    assert not joined.is_alive()
    yield leader, follower, relay, leader_lost, follower_lost
    leader.live._lost.set()  # stop both ends' heartbeats first: closing the relay is no loss to report
    follower.live._lost.set()
    relay.close()


def _steps_then_refusal(follower: Follower, lost: Lost) -> tuple[list[Step], str]:
    """Every step the follower runs until it refuses a frame, and the reason it gave."""
    ran: list[Step] = []
    with pytest.raises(ChannelClosed):
        while True:
            ran.append(follower.next_step())
    assert lost.event.wait(5)
    return ran, lost.reasons[0]


def _names_rank_0_behind(relay: Relay, reason: str) -> None:
    assert f"refused a frame from rank 0 at 127.0.0.1:{relay.port}" in reason, reason


def test_an_honest_relay_changes_nothing(relayed):
    leader, follower, relay, leader_lost, follower_lost = relayed
    for i in range(20):
        leader.broadcast_step(Step(checksum=i, removes=(i,)))
    assert [follower.next_step() for _ in range(20)] == [Step(checksum=i, removes=(i,)) for i in range(20)]
    follower.ready()
    leader.wait_ready()
    assert not leader_lost.reasons and not follower_lost.reasons
    assert len(relay.frames(TO_FOLLOWER, STEP)) == 20


def test_a_replayed_step_is_refused_and_never_run(relayed):
    leader, follower, relay, _, follower_lost = relayed
    relay.tamper = lambda d, raw: [raw, raw] if d == TO_FOLLOWER and raw[0] == STEP else [raw]
    sent = [Step(checksum=1, removes=(5,)), Step(checksum=2)]
    for step in sent:
        leader.broadcast_step(step)
    ran, reason = _steps_then_refusal(follower, follower_lost)
    assert ran == sent[:1]  # the step once, never its copy, and nothing after the refusal
    _names_rank_0_behind(relay, reason)
    assert "replayed or reordered" in reason


def test_an_altered_step_is_refused(relayed):
    leader, follower, relay, _, follower_lost = relayed

    def alter(direction: str, raw: bytes) -> list[bytes]:
        if direction == TO_FOLLOWER and raw[0] == STEP:
            return [raw.replace(b'"r":[5]', b'"r":[6]')]  # drop another request than rank 0 said
        return [raw]

    relay.tamper = alter
    leader.broadcast_step(Step(checksum=1, removes=(5,)))
    ran, reason = _steps_then_refusal(follower, follower_lost)
    assert ran == []
    _names_rank_0_behind(relay, reason)
    assert "bad tag" in reason


def test_a_step_forged_with_everything_but_the_secret_is_refused(relayed):
    """The relay saw both challenges and counts the frames, so it forges the next frame
    exactly as rank 0 would, but for the secret."""
    leader, follower, relay, _, follower_lost = relayed
    leader.broadcast_step(Step(checksum=1))
    assert follower.next_step() == Step(checksum=1)
    leader_nonce = relay.frames(TO_FOLLOWER, CHALLENGE)[0][_HEADER.size :]
    follower_nonce = relay.frames(TO_LEADER, PROOF)[0][_HEADER.size : _HEADER.size + 32]
    forger = Seal(b"a-guess-at-the-cluster-secret", b"leader", leader_nonce, follower_nonce)
    forger.sent = sum(1 for f in relay.seen[TO_FOLLOWER] if f[0] not in (CHALLENGE, PROOF))
    forged = Step(checksum=1, inserts=(), removes=(1, 2, 3))
    relay.inject(TO_FOLLOWER, encode_frame(STEP, forged.to_wire(), forger))
    ran, reason = _steps_then_refusal(follower, follower_lost)
    assert forged not in ran
    _names_rank_0_behind(relay, reason)
    assert "bad tag" in reason


def test_a_bare_frame_after_the_handshake_is_refused(relayed):
    leader, follower, relay, _, follower_lost = relayed
    relay.inject(TO_FOLLOWER, encode_frame(STEP, Step(checksum=0, removes=(1,)).to_wire()))
    ran, reason = _steps_then_refusal(follower, follower_lost)
    assert ran == []
    _names_rank_0_behind(relay, reason)


def test_reordered_steps_are_refused(relayed):
    leader, follower, relay, _, follower_lost = relayed
    held: list[bytes] = []

    def swap(direction: str, raw: bytes) -> list[bytes]:
        if direction != TO_FOLLOWER or raw[0] != STEP:
            return [raw]
        if not held:
            held.append(raw)
            return []
        return [raw, held.pop()]

    relay.tamper = swap
    leader.broadcast_step(Step(checksum=1))
    leader.broadcast_step(Step(checksum=2))
    ran, reason = _steps_then_refusal(follower, follower_lost)
    assert ran == []
    assert "replayed or reordered" in reason


def test_an_oversized_frame_is_refused_without_reading_it(relayed):
    leader, follower, relay, _, follower_lost = relayed
    relay.inject(TO_FOLLOWER, _HEADER.pack(STEP, MAX_FRAME + 24 + 1))  # announces 64 MiB + 1, sends nothing
    ran, reason = _steps_then_refusal(follower, follower_lost)
    assert ran == []
    _names_rank_0_behind(relay, reason)
    assert f"larger than the {MAX_FRAME} allowed" in reason


def test_a_forged_frame_toward_rank_0_loses_the_follower(relayed):
    """Rank 0 refuses it, drops the follower (named) and reports the group lost (the API
    then answers 503 and the rank exits for a restart: tests/runtime/test_control_seal.py)."""
    leader, follower, relay, leader_lost, _ = relayed
    follower.ready()
    leader.wait_ready()
    assert leader.ranks_up() == 2
    # shaped like a sealed FAIL (sequence, payload, tag), the tag a guess
    relay.inject(TO_LEADER, encode_frame(FAIL, b"\0" * 7 + b"\2" + b"impostor-text" + b"t" * TAG_BYTES))
    assert leader_lost.event.wait(5)
    assert "refused a frame from rank 1 (127.0.0.1) and dropped its connection: bad tag" in leader_lost.reasons[0]
    assert "impostor-text" not in leader_lost.reasons[0]  # the forged FAIL's text was never taken as a reason
    assert leader.ranks_up() == 0
    assert relay.closed.wait(5)  # rank 0 closed the connection


def test_an_altered_hello_is_refused_and_the_follower_joins_on_its_next_try(caplog):
    """A relay that rewrites the first HELLO (here: the rank's configuration) gets it
    refused; the follower, told nothing, reconnects, and its honest HELLO joins."""
    caplog.set_level(logging.WARNING, logger="mjc.cluster")
    leader = Leader(("127.0.0.1", 0), 2, ["127.0.0.1"], CONFIG, secret=SECRET, on_lost=Lost())
    leader.start()
    relay = Relay(leader._server.getsockname())
    altered: list[bytes] = []

    def alter_first_hello(direction: str, raw: bytes) -> list[bytes]:
        if direction == TO_LEADER and raw[0] == HELLO and not altered:
            altered.append(raw)
            return [raw.replace(b'"model_id":"m"', b'"model_id":"x"')]
        return [raw]

    relay.tamper = alter_first_hello
    follower = Follower(1, relay.address, CONFIG, secret=SECRET, on_lost=Lost())
    try:
        joining = threading.Thread(target=follower.join, daemon=True)
        joining.start()
        leader.wait_for_peers()
        leader.go()
        joining.join(10)
        assert altered and not joining.is_alive()
        assert "refused its HELLO frame: bad tag" in caplog.text
        hellos = relay.frames(TO_LEADER, HELLO)
        assert len(hellos) == 2 and json.loads(hellos[1][_HEADER.size + 8 : -TAG_BYTES])["config"] == CONFIG
    finally:
        leader.live._lost.set()
        follower.live._lost.set()
        relay.close()
