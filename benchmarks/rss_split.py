#!/usr/bin/env python3
"""Split running processes' RSS by where it lives, every few seconds, as JSON lines (Linux).

    python benchmarks/rss_split.py PID[,PID...] --every 30 --minutes 23 --out split.jsonl

Kinds, from ``/proc/PID/smaps``: ``arena`` (glibc's per-thread malloc heaps: an anonymous
read-write region at a 64 MiB boundary directly followed by its reserved ``---p`` rest),
``heap`` (the main ``[heap]``), ``anon_big`` (other anonymous regions of 1 MiB and more:
MLX's large buffers, Python's object arenas), ``anon_small`` and ``files``. Used to find
what grew in a soak (docs/benchmarks-cpu.md); to split an arena into in-use and free bytes,
``gdb -p PID -batch -ex 'call (void)malloc_stats()'`` prints it to the process's stderr.

A measuring script, not a test.
"""

from __future__ import annotations

import argparse
import json
import time

ARENA_ALIGN = 64 << 20


def regions(pid: int) -> list[dict]:
    out: list[dict] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append({"lo": lo, "hi": hi, "perm": parts[1], "name": parts[5] if len(parts) > 5 else "", "rss": 0})
            elif parts[0] == "Rss:":
                out[-1]["rss"] = int(parts[1])
    return out


def split(pid: int) -> dict:
    regs = regions(pid)
    kb = {"arena": 0, "heap": 0, "anon_big": 0, "anon_small": 0, "files": 0}
    for i, r in enumerate(regs):
        nxt = regs[i + 1] if i + 1 < len(regs) else None
        if r["name"] == "[heap]":
            kind = "heap"
        elif r["name"]:
            kind = "files"
        elif (
            r["lo"] % ARENA_ALIGN == 0
            and r["perm"].startswith("rw")
            and nxt is not None
            and not nxt["name"]
            and nxt["perm"].startswith("---")
            and nxt["lo"] == r["hi"]
        ):
            kind = "arena"
        else:
            kind = "anon_big" if r["hi"] - r["lo"] >= 1 << 20 else "anon_small"
        kb[kind] += r["rss"]
    return {k: round(v / 1024, 1) for k, v in kb.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pids", help="comma-separated process ids")
    p.add_argument("--every", type=float, default=30)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--out", default="/dev/stdout")
    a = p.parse_args()
    pids = [int(x) for x in a.pids.split(",")]
    start = time.monotonic()
    with open(a.out, "a") as f:
        while time.monotonic() - start < a.minutes * 60:
            rec: dict = {"t": round(time.monotonic() - start, 1), "wall": time.strftime("%H:%M:%S")}
            for pid in pids:
                try:
                    rec[str(pid)] = split(pid)
                except OSError as exc:
                    rec[str(pid)] = str(exc)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            time.sleep(a.every)


if __name__ == "__main__":
    main()
