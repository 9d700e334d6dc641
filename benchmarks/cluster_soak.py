#!/usr/bin/env python3
"""Soak a layout where no cluster runs yet (a lent GPU machine, a bare checkout): start the
ranks of a model (``layout_bench.start_layout``: ring on loopback, or nccl with one GPU a
rank), run ``soak.py`` against them with the arguments after ``--``, stop them. Exit status
and report are soak.py's.

    python benchmarks/cluster_soak.py --backend nccl --build 'llama:{"hidden_size": 2048}' \\
        --layout pipeline:2 --out soak.json -- --clients 8 --minutes 6 --warmup 90 --window 60

This is a measuring script, not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from layout_bench import add_model_options, model_from, parse_layout, start_layout

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--layout", default="pipeline:2", help="tensor:N | pipeline:N[:a,b] | generic:N | gather:N")
    p.add_argument("--out", type=Path, help="soak.py's JSON report")
    p.add_argument("soak_args", nargs=argparse.REMAINDER, help="-- then soak.py's options")
    a = p.parse_args(argv)
    model = model_from(p, a)
    extra = [x for x in a.soak_args if x != "--"]
    group = start_layout(model, *parse_layout(a.layout), a.backend)
    try:
        health = group.wait_ready(300)
        print(f"ready: {health.get('parallel')} ({health.get('parallel_reason')})", flush=True)
        out = ["--out", str(a.out)] if a.out else []
        return subprocess.run([sys.executable, str(HERE / "soak.py"), group.api, *extra, *out]).returncode
    finally:
        group.stop()


if __name__ == "__main__":
    sys.exit(main())
