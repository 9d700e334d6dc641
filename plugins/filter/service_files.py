"""Filters that render service-manager files from data, never from hand-written markup."""

from __future__ import annotations

import plistlib
import shlex


def mjc_to_plist(data: dict) -> str:
    """A launchd property list (XML) from a dict, via plistlib."""
    return plistlib.dumps(dict(data), sort_keys=False).decode()


def mjc_systemd_quote(words: list[str], command: bool = True) -> str:
    """Words double-quoted with systemd's escapes: for ExecStart= (``command``, where ``$``
    expands) or for Environment= (where only ``%`` specifiers do)."""

    def quote(word: str) -> str:
        word = str(word).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        return '"' + (word.replace("$", "$$") if command else word) + '"'

    return " ".join(quote(w) for w in words)


def mjc_supervisor_env(env: dict) -> str:
    """supervisord's environment= value: KEY="value",... with quotes and % escaped."""
    return ",".join(f'{k}="' + str(v).replace("%", "%%").replace('"', '\\"') + '"' for k, v in env.items())


def mjc_supervisor_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(str(w)).replace("%", "%%") for w in argv)


class FilterModule:
    def filters(self):
        return {
            "mjc_to_plist": mjc_to_plist,
            "mjc_systemd_quote": mjc_systemd_quote,
            "mjc_supervisor_env": mjc_supervisor_env,
            "mjc_supervisor_command": mjc_supervisor_command,
        }
