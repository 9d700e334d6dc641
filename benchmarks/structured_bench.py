#!/usr/bin/env python3
"""Decode speed with a JSON schema against without, through the API (CPU figures).

Starts ``--ranks`` ranks of one model on this machine (``mlx_jaccl_cluster.launch``),
then, for each number of concurrent streaming clients in ``--clients``, runs
``--rounds`` rounds of the same chat request twice: unconstrained, and constrained by a
JSON schema whose output never closes before ``--tokens`` (one string of at least 100000
characters), so both runs decode the same number of tokens. Greedy decoding. Reports the
median per-stream decode rate and the aggregate tokens/s, and their ratio
(constrained / unconstrained; the issue's target is >= 0.95). Rounds alternate between
the two modes so that drift on a shared machine hits both alike.

    python benchmarks/structured_bench.py --tiny qwen2 --ranks 2 --clients 1 8 --rounds 5 \\
        --out /tmp/structured-bench.json

On a GPU (``benchmarks/device/run.sh structured ...``): ``--shape 772m`` builds the llama
of gpu_bench.py's preset of that name (the tiny tokenizer, 757 tokens, so the mask itself
is cheaper than with a real vocabulary; docs/structured-output.md has the cost per row).

Besides wall-clock rates it reports the CPU time the ranks' processes spent per token
(``/proc/<pid>/stat``, every thread: engine, HTTP, MLX's), which a loaded machine
disturbs less than wall time. ``--profile DIR`` records rank 0 with py-spy (``pip install
py-spy``; raw collapsed stacks, one file per mode and client count, every thread) while
the timed rounds of each mode run.

A measuring script, not a test: it asserts nothing. docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from mlx_jaccl_cluster.launch import start_group  # noqa: E402
from mlx_jaccl_cluster.ops.apibench import PROMPT, concurrent, median  # noqa: E402

#: A schema whose JSON cannot close within the bench's max_tokens: the whole run is constrained.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 100000}},
    "required": ["story"],
    "additionalProperties": False,
}


def body(model_id: str, tokens: int, constrained: bool) -> dict:
    b = {
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": LONG_SCHEMA}}
    return b


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="an mlx-lm model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2", "qwen3"], help="build the tiny random model of this arch")
    src.add_argument("--shape", help="build gpu_bench.py's llama of this preset (772m, 3b, 8b, cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="with --shape")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--parallel", choices=["tensor", "pipeline"], default="tensor")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="record rank 0 with py-spy into this folder")
    opts = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    model = opts.model
    if opts.tiny:
        from mlx_jaccl_cluster.models.tiny import build_tiny_model

        model = build_tiny_model(work / f"tiny-{opts.tiny}", arch=opts.tiny)
    if opts.shape:
        import gpu_bench

        if opts.shape not in gpu_bench.SHAPES:
            parser.error(f"--shape {opts.shape!r}: one of {', '.join(sorted(gpu_bench.SHAPES))}")
        fields = ("hidden_size", "layers", "intermediate_size", "heads", "kv_heads")
        model, _ = gpu_bench.build_model(
            argparse.Namespace(model=None, shape=opts.shape, dtype=opts.dtype, **dict.fromkeys(fields)), work
        )
    group = start_group(model, opts.ranks, work / "cluster", parallel=opts.parallel)
    results = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "model": str(model),
        "shape": opts.shape,
        "dtype": opts.dtype if opts.shape else None,
        "ranks": opts.ranks,
        "parallel": opts.parallel,
        "tokens": opts.tokens,
        "rounds": opts.rounds,
        "runs": [],
    }

    def stop(*_):  # MJC_BENCH_LIMIT (run.sh): keep what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        group.wait_ready(300)
        port = int(group.api.rsplit(":", 1)[1])
        # warm-up at every batch size (a GPU compiles kernels per shape), and the schema is
        # compiled once before timing
        for n in opts.clients:
            for constrained in (False, True):
                concurrent(port, body(group.model_id, opts.tokens, constrained), n, 120, 600)
        pids = [p.pid for p in group.procs if p is not None]
        for n in opts.clients:
            rows = {False: [], True: []}
            modes = (False, True)
            if opts.profile:  # one mode at a time, so each profile holds one mode only
                opts.profile.mkdir(parents=True, exist_ok=True)
                rounds = [(c,) for c in modes for _ in range(opts.rounds)]
            else:
                rounds = [modes] * opts.rounds
            spy = None
            for i, round_modes in enumerate(rounds):
                if opts.profile and i % opts.rounds == 0:
                    spy = py_spy(pids[0], opts.profile / f"{'schema' if round_modes[0] else 'plain'}-{n}.txt")
                for constrained in round_modes:
                    cpu = cpu_seconds(pids)
                    batch = concurrent(port, body(group.model_id, opts.tokens, constrained), n, 120, 600)
                    batch["cpu_s"] = cpu_seconds(pids) - cpu
                    if batch["errors"]:
                        raise RuntimeError(f"{n} clients, constrained={constrained}: {batch['errors'][:2]}")
                    rows[constrained].append(batch)
                if spy is not None and i % opts.rounds == opts.rounds - 1:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
            run = {"clients": n}
            for constrained, key in ((False, "plain"), (True, "schema")):
                run[key] = {
                    "decode_tps_median": median([b["decode_tps_median"] for b in rows[constrained]]),
                    "aggregate_tps_median": median([b["aggregate_tps"] for b in rows[constrained]]),
                    "decode_tps_rounds": [b["decode_tps_median"] for b in rows[constrained]],
                    "aggregate_tps_rounds": [b["aggregate_tps"] for b in rows[constrained]],
                    "completion_tokens": [t for b in rows[constrained] for t in b["completion_tokens"]],
                    "cpu_ms_per_token_rounds": [
                        1000 * b["cpu_s"] / sum(b["completion_tokens"]) for b in rows[constrained]
                    ],
                }
                run[key]["cpu_ms_per_token_median"] = median(run[key]["cpu_ms_per_token_rounds"])
            for metric in ("decode_tps_median", "aggregate_tps_median", "cpu_ms_per_token_median"):
                run[f"ratio_{metric}"] = run["schema"][metric] / run["plain"][metric]
            # each round's schema run against the plain run just before it
            run["paired_ratio_aggregate_median"] = median(
                [s["aggregate_tps"] / p["aggregate_tps"] for p, s in zip(rows[False], rows[True])]
            )
            results["runs"].append(run)
    except KeyboardInterrupt:
        results["interrupted"] = True
    finally:
        group.stop()
    print(
        f"{'clients':>7} | {'plain tok/s (stream / all)':>26} | {'schema tok/s (stream / all)':>27} | "
        "ratio (stream / all) | paired ratio (all) | CPU ms/token (plain / schema)"
    )
    for run in results["runs"]:
        p, s = run["plain"], run["schema"]
        print(
            f"{run['clients']:>7} | {p['decode_tps_median']:>12.1f} / {p['aggregate_tps_median']:>11.1f} | "
            f"{s['decode_tps_median']:>13.1f} / {s['aggregate_tps_median']:>11.1f} | "
            f"{run['ratio_decode_tps_median']:.2f} / {run['ratio_aggregate_tps_median']:.2f}"
            f"{'':>8} | {run['paired_ratio_aggregate_median']:>18.2f} | "
            f"{p['cpu_ms_per_token_median']:.3f} / {s['cpu_ms_per_token_median']:.3f}"
        )
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=2))
    return 0


def py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy recording ``pid`` (every thread, idle ones too) until it gets SIGINT."""
    exe = Path(sys.executable).with_name("py-spy")
    cmd = [str(exe), "record", "--pid", str(pid), "--rate", "250", "--threads", "--idle", "--format", "raw"]
    return subprocess.Popen([*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
