#!/usr/bin/env python3
"""Split running processes' RSS by where it lives, every few seconds, as JSON lines (Linux).

    python benchmarks/rss_split.py PID[,PID...] --every 30 --minutes 23 --out split.jsonl
    python benchmarks/rss_split.py smapsA.gz,smapsB.gz     # saved copies of /proc/PID/smaps

Kinds, from ``/proc/PID/smaps``: ``arena`` (glibc's per-thread malloc arenas: anonymous
read-write heaps at a 64 MiB boundary, each followed by its reserved ``---p`` rest until it
has grown to fill its 64 MiB; ``arena_heaps`` counts those heaps, and an arena may chain
several),
``heap`` (the main ``[heap]``), ``anon_big`` (other anonymous regions of 1 MiB and more:
MLX's large buffers, Python's object arenas), ``anon_small`` and ``files``. Used to find
what grew in a soak (docs/benchmarks-cpu.md); to split an arena into in-use and free bytes,
``gdb -p PID -batch -ex 'call (void)malloc_stats()'`` prints it to the process's stderr.

A measuring script, not a test.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

ARENA_ALIGN = 64 << 20


def regions(source: int | str) -> list[dict]:
    """The regions of process ``source`` (a PID), or of a saved copy of its smaps (a path,
    gzipped when it ends in .gz)."""
    out: list[dict] = []
    path = f"/proc/{source}/smaps" if isinstance(source, int) else source
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append({"lo": lo, "hi": hi, "perm": parts[1], "name": parts[5] if len(parts) > 5 else "", "rss": 0})
            elif parts[0] == "Rss:":
                out[-1]["rss"] = int(parts[1])
    return out


def _arena_heaps(r: dict, nxt: dict | None) -> int:
    """How many of glibc's 64 MiB arena heaps region ``r`` is (0: none). A heap starts at a
    64 MiB boundary; a growing one is followed by its reserved ``---p`` rest, a full one
    fills its 64 MiB (and smaps shows neighbouring full heaps as one region)."""
    if r["name"] or not r["perm"].startswith("rw") or r["lo"] % ARENA_ALIGN:
        return 0
    size = r["hi"] - r["lo"]
    growing = nxt is not None and not nxt["name"] and nxt["perm"].startswith("---") and nxt["lo"] == r["hi"]
    if growing or size % ARENA_ALIGN == 0:
        return -(-size // ARENA_ALIGN)
    return 0  # e.g. a library's 2 MiB data that happens to start at a boundary


def split(source: int | str) -> dict:
    regs = regions(source)
    kb = {"arena": 0, "heap": 0, "anon_big": 0, "anon_small": 0, "files": 0}
    heaps = 0
    for i, r in enumerate(regs):
        n = _arena_heaps(r, regs[i + 1] if i + 1 < len(regs) else None)
        heaps += n
        if r["name"] == "[heap]":
            kind = "heap"
        elif r["name"]:
            kind = "files"
        elif n:
            kind = "arena"
        else:
            kind = "anon_big" if r["hi"] - r["lo"] >= 1 << 20 else "anon_small"
        kb[kind] += r["rss"]
    return {k: round(v / 1024, 1) for k, v in kb.items()} | {"arena_heaps": heaps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pids", help="comma-separated process ids, or saved smaps files (then one line each)")
    p.add_argument("--every", type=float, default=30)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--out", default="/dev/stdout")
    a = p.parse_args()
    if not a.pids.replace(",", "").isdigit():
        for path in a.pids.split(","):
            print(json.dumps({path: split(path)}))
        return
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
