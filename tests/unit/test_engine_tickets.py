"""Every request rank 0 accepted gets an answer when the group breaks, wherever it was: in
the inbox, placed in the batch, or in the engine thread's hands between the two (the
broadcast and the prefill run collectives there, and a peer that dies fails them)."""

from __future__ import annotations

import queue

import pytest

from mlx_jaccl_cluster.engine.core import Engine, EngineUnavailable
from mlx_jaccl_cluster.generation import ErrorEvent, GenerationRequest
from mlx_jaccl_cluster.settings import Settings
from mlx_jaccl_cluster.state import ClusterState

LOST = "cluster lost a rank: rank 1 (10.0.0.2) disconnected"


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """Rank 0's engine, ready, with its start-up and model work stubbed (no MLX here)."""
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    e = Engine(Settings(model=tmp_path, world_size=1, rank=0), ClusterState(1, "ring", "m"), None, lambda *a: None)
    e.state.set("ready")
    e.answered = []
    e.attach(e.answered.extend)
    monkeypatch.setattr(e, "_reuse", lambda requests: [(None, 0)] * len(requests))
    monkeypatch.setattr(e, "_goes_alone", lambda requests, reused: False)
    return e


def _errors(engine) -> list[tuple[object, int, str]]:
    return [(t, e.status, e.message) for t, e in engine.answered if isinstance(e, ErrorEvent)]


def test_a_request_held_by_the_engine_when_the_group_breaks_gets_its_503(engine, monkeypatch):
    """The channel's lost hook runs while the engine thread is inside a collective for a
    request it has taken but not yet placed; the collective then fails."""

    def apply(*_):
        engine.fail_all(LOST)  # the control channel's hook, on its own thread
        raise RuntimeError("[ring] connection to a peer was lost")

    monkeypatch.setattr(engine, "_apply", apply)
    ticket = engine.submit(GenerationRequest([1, 2, 3], 4), sink=lambda e: None)
    with pytest.raises(RuntimeError):
        engine._leader_loop()
    assert _errors(engine) == [(ticket, 503, LOST)]


def test_a_request_taken_just_after_the_inbox_was_drained_is_refused_not_run(engine, monkeypatch):
    """fail_all empties the inbox; a ticket the engine thread got out of it a moment
    before is answered by the engine thread instead of being run."""
    ticket = engine.submit(GenerationRequest([1, 2, 3], 4), sink=lambda e: None)

    class LosesAfterGet(queue.SimpleQueue):
        def get(self, *a, **kw):
            item = super().get(*a, **kw)
            engine.fail_all(LOST)  # between the engine's get and its bookkeeping
            return item

    inbox = LosesAfterGet()
    inbox.put(engine._inbox.get_nowait())
    engine._inbox = inbox
    assert engine._collect(block=True) == ([], [])  # nothing for the loop to place or run
    assert _errors(engine) == [(ticket, 503, LOST)]
    assert not engine._held


def test_a_request_placed_after_fail_all_is_not_served_again(engine, monkeypatch):
    """The collective finished before the peer died: the loop places the batch, but the
    tickets fail_all answered are not registered to receive tokens."""

    def apply(requests, *_):
        engine.fail_all(LOST)
        return list(range(len(requests)))

    monkeypatch.setattr(engine, "_apply", apply)
    monkeypatch.setattr(engine, "_step", lambda: [])
    engine.submit(GenerationRequest([1, 2, 3], 4), sink=lambda e: None)
    engine._active = {0}  # the loop runs one step, then waits on the inbox: stop it there
    monkeypatch.setattr(engine, "_collect", _once(engine._collect))
    with pytest.raises(StopIteration):
        engine._leader_loop()
    assert not engine._tickets and len(_errors(engine)) == 1


def _once(collect):
    calls = []

    def wrapped(*a, **kw):
        if calls:
            raise StopIteration
        calls.append(1)
        return collect(*a, **kw)

    return wrapped


def test_after_fail_all_nothing_is_accepted_and_nothing_is_left_unanswered(engine):
    queued = engine.submit(GenerationRequest([1], 4), sink=lambda e: None)
    engine.fail_all(LOST)
    with pytest.raises(EngineUnavailable, match="rank 1"):
        engine.submit(GenerationRequest([2], 4), sink=lambda e: None)
    assert _errors(engine) == [(queued, 503, LOST)]
    assert engine._inbox.empty() and not engine._held and not engine._tickets
