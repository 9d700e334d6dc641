#!/usr/bin/env python3
"""Which layout serves a model fastest on this machine: 1 rank in-process vs N ranks split
by tensor or pipeline, through our API. Used to pick inventory/local's default.

For each ``--layout`` (``inprocess``, ``tensor:N``, ``pipeline:N`` or ``pipeline:N:a,b``
for an explicit split) it measures, after one warm-up request:

- the README question (``What is the capital of France?``, 24 tokens, greedy, not
  streamed, as ``make up`` asks it): wall time of the whole request;
- one streaming request of ``--max-tokens`` tokens on a longer prompt: TTFT and the
  decode rate, (tokens - 1) / (last token - first token).

Figures are medians over ``--repeats`` rounds. Because this machine is shared (other jobs
can take most of both cores), it also reports **CPU seconds per generated token** over the
streaming rounds (every rank's user + system time from ``/proc/PID/stat``; in-process: the
process's own), which the other jobs do not inflate: with ranks that compute one after the
other (a pipeline, or one rank), an idle machine decodes at about 1 / that figure. In-process uses mlx-lm's ``stream_generate``
on the same chat-templated prompt (its prompt_tps / generation_tps and the wall time).
Ranks are started directly (``mlx_jaccl_cluster.launch.start_group``, ring on loopback).

    python benchmarks/layout_bench.py --model /tmp/smollm2-q4 \\
        --layout inprocess --layout tensor:3 --layout pipeline:2 --repeats 5
    # two GPUs (nccl, one a rank; a pipeline there hands over by all_gather):
    python benchmarks/layout_bench.py --backend nccl --build 'llama:{"hidden_size": 2048}' \\
        --layout inprocess --layout tensor:2 --layout pipeline:2

This is a measuring script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlx_jaccl_cluster.launch import start_group
from mlx_jaccl_cluster.ops.apibench import stream_chat

QUESTION = "What is the capital of France?"
LONG = "Write a long story about a dragon who learns to bake bread in a small village."


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    """POST JSON, return the JSON answer (stdlib: the GPU machines have no httpx)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def bench_inprocess(model: Path, repeats: int, max_tokens: int) -> dict:
    from mlx_lm import load, stream_generate

    m, tok = load(str(model))

    def run(content, n):
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        t0 = time.perf_counter()
        first = None
        last = None
        text = []
        for r in stream_generate(m, tok, prompt, max_tokens=n):
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(r.text)
        return {
            "wall_s": last - t0,
            "ttft_s": first - t0,
            "decode_tps": r.generation_tokens and (r.generation_tokens - 1) / (last - first) if last > first else None,
            "prompt_tokens": r.prompt_tokens,
            "tokens": r.generation_tokens,
            "text": "".join(text),
        }

    run(QUESTION, 8)
    q = [run(QUESTION, 24) for _ in range(repeats)]
    cpu0 = time.process_time()
    s = [run(LONG, max_tokens) for _ in range(repeats)]
    cpu = time.process_time() - cpu0
    return {
        "question_s": _median([r["wall_s"] for r in q]),
        "answer": q[-1]["text"],
        "cpu_s_per_token": round(cpu / sum(r["tokens"] for r in s), 4),
        "ttft_s": _median([r["ttft_s"] for r in s]),
        "decode_tps": _median([r["decode_tps"] for r in s]),
        "prompt_tokens": s[-1]["prompt_tokens"],
        "tokens": s[-1]["tokens"],
    }


def backend_env(backend: str, world: int) -> dict:
    """The ranks' environment for ``backend``: ring on loopback (start_group's default), or
    nccl with one GPU a rank (mjc-rank pins its device from its rank)."""
    if backend == "ring":
        return {}
    from mlx_jaccl_cluster.launch import free_ports

    (port,) = free_ports(1)
    return {"MJC_BACKEND": "nccl", "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port), "MLX_WORLD_SIZE": str(world)}


def parse_layout(text: str) -> tuple[str, int, list[int] | None]:
    """``KIND:N[:a,b,...]`` (tensor, pipeline, generic, gather) -> (kind, ranks, split)."""
    parts = text.split(":")
    split = [int(n) for n in parts[2].split(",")] if len(parts) > 2 else None
    return parts[0], int(parts[1]), split


def start_layout(model: Path, kind: str, world: int, split, backend: str = "ring"):
    """Start ``world`` ranks of ``model`` laid out as ``kind`` (parse_layout); not yet ready."""
    work = Path(tempfile.mkdtemp(prefix="mjc-layout-"))
    # a generous heartbeat: on a loaded 2-core machine a rank can stall for seconds while loading
    args = ("--heartbeat-misses", "30")
    parallel = kind
    if kind == "generic":
        parallel, args = "pipeline", args + ("--generic-pipeline",)
    elif kind == "gather":  # the all_gather hand-over (what nccl runs) on any backend
        parallel, args = "pipeline", args + ("--pipeline-transport", "all_gather")
    env = backend_env(backend, world)
    return start_group(model, world, work, parallel=parallel, split=split, args=args, env=env)


def bench_cluster(
    model: Path, kind: str, world: int, split, repeats: int, max_tokens: int, backend: str = "ring"
) -> dict:
    group = start_layout(model, kind, world, split, backend)
    try:
        t0 = time.perf_counter()
        health = group.wait_ready(300)
        ready_s = time.perf_counter() - t0
        port = int(group.api.rsplit(":", 1)[1])
        body = {
            "model": group.model_id,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24,
            "temperature": 0,
        }
        _post(group.url("/v1/chat/completions"), body | {"max_tokens": 8})
        q = []
        for _ in range(repeats):
            t = time.perf_counter()
            reply = _post(group.url("/v1/chat/completions"), body)
            q.append(time.perf_counter() - t)
        answer = reply["choices"][0]["message"]["content"]
        long_body = {
            "model": group.model_id,
            "messages": [{"role": "user", "content": LONG}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        s = []
        pids = [p.pid for p in group.procs if p is not None]
        cpu0 = sum(_cpu_s(pid) for pid in pids)
        for i in range(repeats):
            # a different prompt each round, so the prompt cache cannot skip the prefill
            b = long_body | {"messages": [{"role": "user", "content": f"{i}. {LONG}"}]}
            res = stream_chat(port, b, io_timeout=300, deadline=600)
            if not res["ok"]:
                raise RuntimeError(res["error"])
            s.append(res)
        cpu = sum(_cpu_s(pid) for pid in pids) - cpu0
        return {
            "question_s": _median(q),
            "answer": answer,
            "cpu_s_per_token": round(cpu / sum(r.get("completion_tokens") or 0 for r in s), 4),
            "ttft_s": _median([r.get("ttft_s") for r in s]),
            "decode_tps": _median([r.get("decode_tps") for r in s]),
            "prompt_tokens": s[-1].get("prompt_tokens"),
            "tokens": s[-1].get("completion_tokens"),
            "ready_s": round(ready_s, 1),
            "parallel": health.get("parallel"),
            "reason": health.get("parallel_reason"),
            "backend": backend,
        }
    finally:
        group.stop()


def build(spec: str, dtype: str) -> Path:
    """A random-weight model from ``ARCH:JSON`` (in a child process, so this one holds no
    accelerator memory while the ranks run)."""
    import subprocess

    arch, _, shape = spec.partition(":")
    out = Path(tempfile.mkdtemp(prefix="mjc-layout-model-")) / f"{arch}-{dtype}"
    code = (
        "import sys, json; from mlx_jaccl_cluster.models.tiny import build_tiny_model; "
        "build_tiny_model(sys.argv[1], arch=sys.argv[2], dtype=sys.argv[3], **json.loads(sys.argv[4]))"
    )
    subprocess.run([sys.executable, "-c", code, str(out), arch, dtype, shape or "{}"], check=True)
    return out


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model / --build / --dtype / --backend (this script's and cluster_soak.py's)."""
    p.add_argument("--model", type=Path, help="an mlx-lm model folder (or --build)")
    p.add_argument(
        "--build",
        metavar="ARCH:JSON",
        help='build a random-weight model instead, e.g. qwen2:{"hidden_size": 2048, "num_hidden_layers": 28} '
        "(models.tiny.build_tiny_model; --dtype sets its weights' type)",
    )
    p.add_argument("--dtype", default="bfloat16", help="dtype of a --build model")
    p.add_argument(
        "--backend", choices=("ring", "nccl"), default="ring", help="the ranks' backend (nccl: one GPU each)"
    )


def model_from(p: argparse.ArgumentParser, a: argparse.Namespace) -> Path:
    """The model folder the options name (building it for --build); offline from here on."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.build:
        return build(a.build, a.dtype)
    if a.model is None:
        p.error("give --model or --build")
    return a.model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument(
        "--layout",
        action="append",
        required=True,
        help="inprocess | tensor:N | pipeline:N | pipeline:N:a,b | generic:N (the generic split even "
        "where mlx-lm has pipeline()) | gather:N (a pipeline handing over by all_gather) (repeatable)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    a.model = model_from(p, a)
    rows = []
    for layout in a.layout:
        if layout == "inprocess":
            row = bench_inprocess(a.model, a.repeats, a.max_tokens)
        else:
            row = bench_cluster(a.model, *parse_layout(layout), a.repeats, a.max_tokens, a.backend)
        row = {"layout": layout, "model": a.model.name, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["layout"] == "inprocess"), None)
    print(
        "\n| model | layout | README question (s) | TTFT (s) | decode (tok/s) | vs in-process | CPU s/token | "
        "in-process CPU / this |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rel = f"{r['decode_tps'] / base['decode_tps']:.2f}" if base and r["decode_tps"] and base["decode_tps"] else ""
        eff = f"{base['cpu_s_per_token'] / r['cpu_s_per_token']:.2f}" if base and r.get("cpu_s_per_token") else ""
        print(
            f"| {r['model']} | {r['layout']} | {r['question_s']} | {r['ttft_s']} | {r['decode_tps']} | {rel} | "
            f"{r.get('cpu_s_per_token')} | {eff} |"
        )
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
