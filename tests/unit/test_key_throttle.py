"""api/guard.py's throttle of wrong API keys, on a fake clock: who is blocked, how long, and
that the table stays bounded."""

from __future__ import annotations

from mlx_jaccl_cluster.api import guard
from mlx_jaccl_cluster.api.guard import KeyThrottle, is_public


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_free_failures_then_doubling_blocks_up_to_the_cap():
    clock = Clock()
    t = KeyThrottle(3, clock)
    for _ in range(3):
        t.failed("10.0.0.1")
        assert t.blocked_for("10.0.0.1") == 0
    waits = []
    for _ in range(9):
        t.failed("10.0.0.1")
        waits.append(t.blocked_for("10.0.0.1"))
    assert waits[:4] == [1, 2, 4, 8] and waits[-1] == guard.KEY_BLOCK_MAX
    assert t.blocked_for("10.0.0.2") == 0  # other addresses are not affected
    clock.now += guard.KEY_BLOCK_MAX
    assert t.blocked_for("10.0.0.1") == 0
    t.succeeded("10.0.0.1")
    assert len(t) == 0


def test_the_table_is_bounded_and_drops_the_least_recently_seen(monkeypatch):
    monkeypatch.setattr(guard, "KEY_TABLE_SIZE", 100)
    t = KeyThrottle(0, Clock())
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    assert t.blocked_for("10.0.0.0") == 0 and t.blocked_for("10.0.3.231") > 0


def test_only_health_the_dashboard_page_and_the_schema_are_open():
    assert all(is_public(p) for p in ("/health", "/dashboard", "/openapi.json", "/dashboard/static/app.js"))
    assert not any(is_public(p) for p in ("/v1/models", "/dashboard/state", "/metrics", "/errors", "/healthz", "/"))
