"""A rank killed with SIGKILL: the cluster serves again on its own.

Nothing but the service manager and the ranks act: systemd (Restart=always) starts the
killed rank again, the other ranks leave the broken group and are restarted too (crash-only
ranks), and the group re-forms. Runs last: it restarts every rank.
"""

from __future__ import annotations

import time
import urllib.error

import pytest
from conftest import UNIT, chat, http, unit_property, wait_for

KILLED = 1  # the rank whose process gets SIGKILL
RECOVERY_TIMEOUT = 120  # seconds; about 5 s on an idle lab


def health(lab) -> dict:
    """/health of rank 0 with its HTTP status; {} while nothing answers."""
    try:
        status, body = http(f"{lab.api}/health", timeout=5)
    except (urllib.error.URLError, OSError):
        return {}
    return {**body, "http": status}


@pytest.fixture(scope="module")
def recovery(lab):
    victim = lab.host(lab.ranks[KILLED].name)
    before = {"pid": unit_property(victim, "MainPID"), "restarts": int(unit_property(victim, "NRestarts"))}
    assert health(lab).get("http") == 200, "the cluster must serve before the kill"
    victim.check_output(f"kill -KILL {before['pid']}")
    killed_at = time.monotonic()
    saw = {"down": False}

    def serving_again():
        h = health(lab)
        if h.get("http") != 200:
            saw["down"] = True  # rank 0 noticed: 503 while the group is lost, or no answer while it restarts
            return None
        # A rank 0 started after the kill has re-formed the group even if no poll saw it down.
        restarted = saw["down"] or h.get("uptime_s", 1e9) < time.monotonic() - killed_at
        return h if restarted and h.get("ranks_up") == len(lab.ranks) else None

    final = wait_for(serving_again, RECOVERY_TIMEOUT) or health(lab)
    recovered_s = time.monotonic() - killed_at
    print(f"\nrank {KILLED} killed: serving again after {recovered_s:.1f} s")
    return {
        "before": before,
        "health": final,
        "seconds": recovered_s,
        "after": {"pid": unit_property(victim, "MainPID"), "restarts": int(unit_property(victim, "NRestarts"))},
    }


def test_systemd_started_the_killed_rank_again(recovery):
    assert recovery["after"]["restarts"] > recovery["before"]["restarts"], recovery


def test_the_killed_rank_runs_in_a_new_process(recovery):
    assert recovery["after"]["pid"] not in ("0", recovery["before"]["pid"]), recovery


def test_rank0_reports_every_rank_up_again(recovery, lab):
    h = recovery["health"]
    assert (h.get("http"), h.get("ranks_up")) == (200, len(lab.ranks)), recovery


def test_every_unit_is_active_again(lab, recovery):
    states = {r.name: lab.host(r.name).run(f"systemctl --user is-active {UNIT}").stdout.strip() for r in lab.ranks}
    assert set(states.values()) == {"active"}, states


def test_a_chat_request_works_again(lab, recovery):
    status, reply = chat(lab, "Are you back?", max_tokens=8)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"].strip()
