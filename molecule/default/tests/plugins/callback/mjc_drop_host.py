"""Test-only callback: a lab host goes away just before a given play starts.

With ``MJC_DROP_NETNS`` (the host's network namespace) and ``MJC_DROP_BEFORE`` (the start of
a play's name) set, it kills every sshd of that namespace host (the listener and the open
sessions, so Ansible's ControlMaster connection breaks too) when that play starts, before
any of its tasks. test_guards.py enables it and starts the sshd again afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess

from ansible.plugins.callback import CallbackBase

SSHD_NAMES = ("sshd", "sshd-session", "sshd-auth")


def sshd_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False).stdout
    pids = []
    for pid in out.split():
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() in SSHD_NAMES:
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "mjc_drop_host"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._done = False

    def v2_playbook_on_play_start(self, play) -> None:
        netns, before = os.environ.get("MJC_DROP_NETNS"), os.environ.get("MJC_DROP_BEFORE")
        if self._done or not netns or not before or not play.get_name().startswith(before):
            return
        self._done = True
        pids = sshd_pids(netns)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._display.display(f"mjc_drop_host: killed sshd {pids} of {netns} before play {play.get_name()!r}")
