#!/usr/bin/env python3
"""GPU benchmark: the runtime's serving overhead on one GPU, and its tensor-parallel scaling.

Two modes, each one command on one device machine (``benchmarks/device/run.sh`` installs
the wheels and calls this file; docs/BENCHMARKS.md has the commands and the figures):

- ``single``: one GPU, a random-weight llama built on the spot (default: the 772M float32
  shape of /work/shared/reference/gpu.md). Loaded side by side and run in turn:
  in-process ``stream_generate`` (1 stream) and mlx-lm's ``BatchGenerator`` on N copies of
  the prompt (what ``batch_generate`` runs: the in-process limit for N clients), the
  runtime (1 rank) through its HTTP API, ``mlx_lm.server``, and optionally the runtime of
  other trees (``--variant NAME=DIR``, to measure a change on the same machine in one run).
  ``BatchGenerator`` on one sequence is timed too ("in-process batch-1": the runtime's own
  engine without HTTP; its rate includes the prefill).
- ``tp``: the runtime with 1 rank against the runtime with ``--ranks`` ranks, tensor
  parallel over the ``nccl`` backend (one GPU a rank), same model: scaling at 1 and N
  clients, and whether greedy output matches 1 rank.

Every system is warmed up first (CUDA kernels compile on first use, per shape): one
1-client request and one N-client round each. Rounds rotate the order of the systems.
Decode tok/s = (tokens - 1) / (last token - first token); TTFT = request sent -> first
token. Figures are medians over the rounds. ``--profile S`` records rank 0 (and rank 1
in ``tp``) of the runtime with py-spy for S seconds of 1-client traffic.

The process pieces (in-process baseline, mlx_lm.server) are ``benchmarks/baselines.py``'s, the
HTTP client and helpers ``bench_common.py``'s. Writes every raw figure to ``--out`` (JSON) and prints
a table last. A measuring script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as rb  # noqa: E402
from baselines import Baseline, Peer  # noqa: E402

TARGETS = {  # issue 15, distinct prompts
    "one_client_vs_inproc": 0.95,  # runtime decode tok/s / in-process stream_generate
    "concurrent_vs_inproc_batch": 0.95,  # runtime aggregate tok/s / in-process BatchGenerator
    "one_client_vs_peer": 1.8,  # runtime decode tok/s / mlx_lm.server
    "concurrent_vs_peer": 1.5,  # runtime aggregate tok/s / mlx_lm.server
    "ttft_delta_ms": 5.0,  # runtime TTFT - in-process TTFT, 1 client
    "interleave_p99_vs_quiet": 2.0,  # inter-token p99 of 7 decoders during an 8k prefill / alone
}

CONTEXT = 16384  # max_position_embeddings of the built models: room for the 8k prompt of `interleave`
SHAPES = {  # --shape presets; each flag below overrides one field
    "772m": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=5120,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=CONTEXT,
    ),
    "3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=CONTEXT,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=CONTEXT,
    ),  # Llama-3-8B's shape (tiny vocabulary)
    "cpu": dict(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=CONTEXT,
    ),
}


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------
def build_model(opts, workdir: Path) -> tuple[Path, dict]:
    if opts.model:
        return opts.model.resolve(), {"source": str(opts.model)}
    shape = dict(SHAPES[opts.shape])
    for key, flag in (
        ("hidden_size", "hidden_size"),
        ("num_hidden_layers", "layers"),
        ("intermediate_size", "intermediate_size"),
        ("num_attention_heads", "heads"),
        ("num_key_value_heads", "kv_heads"),
    ):
        if getattr(opts, flag) is not None:
            shape[key] = getattr(opts, flag)
    tag = f"{opts.shape}-{opts.dtype}-" + "-".join(f"{v}" for _, v in sorted(shape.items()))
    out = workdir / "models" / f"llama-{tag}"
    t0 = time.monotonic()
    if not (out / "config.json").is_file():
        # in a child process, so that this one holds no GPU memory afterwards
        code = (
            "import sys, json; from mlx_jaccl_cluster.models import build_tiny_model; "
            "build_tiny_model(sys.argv[1], arch='llama', dtype=sys.argv[2], **json.loads(sys.argv[3]))"
        )
        subprocess.run([sys.executable, "-c", code, str(out), opts.dtype, json.dumps(shape)], check=True)
    config = json.loads((out / "config.json").read_text())
    params = param_count(out)
    rb.log(
        f"model {out.name}: {params / 1e6:.0f}M parameters, {rb.model_bytes(out) / 2**30:.2f} GiB "
        f"({time.monotonic() - t0:.0f} s)"
    )
    return out, {
        "source": f"build_tiny_model(arch='llama', dtype={opts.dtype!r}, {shape})",
        "parameters": params,
        "config": config,
    }


def param_count(model: Path) -> int:
    total = 0
    for f in model.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


# --------------------------------------------------------------------------------------
# the systems
# --------------------------------------------------------------------------------------
class Ours:
    """The runtime (``mjc-rank`` processes via ``launch.start_group``) on one backend."""

    def __init__(
        self,
        name: str,
        model: Path,
        workdir: Path,
        ranks: int,
        backend: str,
        pythonpath: str | None = None,
        env: dict | None = None,
    ):
        from mlx_jaccl_cluster.launch import free_ports, start_group

        self.name = name
        env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"} | (env or {})
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")
        if backend == "nccl":
            (port,) = free_ports(1)
            env |= {
                "MJC_BACKEND": "nccl",
                "NCCL_HOST_IP": "127.0.0.1",
                "NCCL_PORT": str(port),
                "MLX_WORLD_SIZE": str(ranks),
            }
        self.group = start_group(model, ranks, workdir / name, args=("--log-level", "warning"), env=env)
        self.port = int(self.group.api.rsplit(":", 1)[1])
        self.model_id = self.group.model_id

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.group.procs if p is not None]

    def wait_ready(self, timeout: float) -> None:
        self.group.wait_ready(timeout=timeout)

    def close(self) -> dict:
        hwm = [rb.proc_status(pid).get("VmHWM") for pid in self.pids]
        self.group.stop()
        return {"vmhwm": hwm}

    def logs(self) -> dict:
        return {r: rb.tail(self.group.logs[r]) for r in range(len(self.group.procs))}


class System:
    """One thing measured: how to send it one request and one N-client round.

    Requests carry distinct prompts (``Prompts``): a round gives every system the same
    prompt numbers, so that texts compare and no system has seen a prompt before. A system
    made with ``same=True`` is sent the one fixed prompt every time instead (its prompt
    cache serves it: the cache-on row), at one client only."""

    def __init__(self, name: str, kind: str, obj, model_id: str = "", prompts=None, same: bool = False):
        self.name, self.kind, self.obj, self.model_id, self.prompts, self.same = (
            name,
            kind,
            obj,
            model_id,
            prompts,
            same,
        )
        self.tokens = 0
        self.one: list[dict] = []
        self.many: list[dict] = []
        self.warmup: dict = {}
        self.error: str | None = None

    @property
    def pids(self) -> list[int]:
        return self.obj.pids

    @property
    def takes_clients(self) -> bool:
        return self.kind != "inproc-b1" and not self.same

    def _bodies(self, start: int, n: int) -> list[dict]:
        if self.same:
            return [rb.chat_body(self.model_id, self.tokens)] * n
        return [rb.chat_body(self.model_id, self.tokens, t) for t in self.prompts.take(start, n)]

    def one_client(self, opts, start: int) -> dict:
        self.tokens = opts.tokens
        index = None if self.same else start
        if self.kind == "inproc":
            return self.obj.run_once(opts.request_deadline, index)
        if self.kind == "inproc-b1":
            r = self.obj.run_batch(1, opts.request_deadline, index)
            return r | {"decode_tps": r["aggregate_tps"]}
        if self.kind == "peer":
            self.obj.resume()
        try:
            return rb.strip(
                rb.stream_chat(self.obj.port, self._bodies(start, 1)[0], opts.io_timeout, opts.request_deadline)
            )
        finally:
            if self.kind == "peer":
                self.obj.pause()

    def clients(self, opts, start: int) -> dict:
        self.tokens = opts.tokens
        if self.kind == "inproc":
            return self.obj.run_batch(opts.clients, opts.request_deadline * 2, None if self.same else start)
        if self.kind == "peer":
            self.obj.resume()
        try:
            return rb.concurrent(
                self.obj.port, self._bodies(start, opts.clients), opts.clients, opts.io_timeout, opts.request_deadline
            )
        finally:
            if self.kind == "peer":
                self.obj.pause()

    def summary(self) -> dict:
        ok = [r for r in self.one if not r.get("error")]
        many = [r for r in self.many if not r.get("errors")]
        runs = sorted({r.get("run", 0) for r in self.one} | {r.get("run", 0) for r in self.many})
        per_run = []
        for k in runs:
            o = [r for r in ok if r.get("run", 0) == k]
            m = [r for r in many if r.get("run", 0) == k]
            per_run.append(
                {
                    "run": k,
                    "decode_tps": rb.median([r.get("decode_tps") for r in o]),
                    "ttft_ms": ms(rb.median([r.get("ttft_s") for r in o])),
                    "aggregate_tps": rb.median([r.get("aggregate_tps") for r in m]),
                }
            )
        out = {
            "error": self.error,
            "decode_tps": rb.median([r.get("decode_tps") for r in ok]),
            "decode_tps_runs": [round(r["decode_tps"], 1) if r.get("decode_tps") else None for r in self.one],
            "ttft_ms": ms(rb.median([r.get("ttft_s") for r in ok])),
            "cpu_ms_per_token": rb.median([r.get("server_cpu_ms_per_token") for r in ok]),
            "aggregate_tps": rb.median([r.get("aggregate_tps") for r in many]),
            "aggregate_tps_runs": [round(r["aggregate_tps"], 1) if r.get("aggregate_tps") else None for r in self.many],
            "clients_ttft_ms": ms(rb.median([r.get("ttft_s_median") for r in many])),
            "completion_tokens": sorted({r.get("completion_tokens") for r in self.one} - {None}),
            "prompt_tokens": sorted(
                {r.get("prompt_tokens") for r in self.one}
                | {t for r in self.many for t in (r.get("prompt_tokens") or [])} - {None}
            ),
            "cached_tokens_median": rb.median(
                [r.get("cached_tokens") for r in ok] + [t for r in self.many for t in (r.get("cached_tokens") or [])]
            ),
            "per_run": per_run,
            "text0": ok[0].get("text", "") if ok else "",
        }
        return out


def sys_logs(s: System) -> dict:
    if s.kind == "ours":
        return s.obj.logs()
    return {r: rb.tail(f) for r, f in enumerate(getattr(s.obj, "logs", []))}


def ms(x):
    return None if x is None else x * 1000


def rounds(systems: list[System], opts, prompt0: int = 0) -> int:
    """Warm-up, then ``--runs`` runs of 1-client rounds and N-client rounds, the order of the
    systems rotating each round. Every round gives all systems the same fresh prompt numbers;
    returns the next unused number."""
    nxt = prompt0
    live = [s for s in systems if s.error is None]
    for s in live:
        rb.log(f"{s.name}: warm-up (1 client, then {opts.clients} clients)")
        try:
            w1 = s.one_client(opts, nxt)
            wn = s.clients(opts, nxt + 1) if opts.clients and s.takes_clients else {}
            s.warmup = {"one": w1, "many": {k: v for k, v in wn.items() if k != "text0"}}
            err = w1.get("error") or (wn.get("errors") or [None])[0]
            if err:
                s.error = f"warm-up failed: {err}"
        except Exception as exc:
            s.error = f"warm-up failed: {type(exc).__name__}: {exc}"
    nxt += 1 + opts.clients
    live = [s for s in systems if s.error is None]
    for run in range(opts.runs):
        rb.log(f"run {run + 1}/{opts.runs}: 1 client x {opts.repeats}: " + ", ".join(s.name for s in live))
        for i in range(opts.repeats):
            k = i % len(live)
            for s in live[k:] + live[:k]:
                if s.error is None:
                    r = rb.with_cpu(lambda: s.one_client(opts, nxt), s.pids)
                    r["run"] = run
                    s.one.append(r)
                    if r.get("error"):
                        s.error = f"1-client request failed: {r['error']}"
            nxt += 1
        if not opts.clients:
            continue
        many = [s for s in live if s.takes_clients]
        rb.log(
            f"run {run + 1}/{opts.runs}: {opts.clients} clients x {opts.concurrent_repeats}: "
            + ", ".join(s.name for s in many)
        )
        for i in range(opts.concurrent_repeats):
            k = i % len(many)
            for s in many[k:] + many[:k]:
                if s.error is None:
                    r = s.clients(opts, nxt)
                    r.pop("text0", None)
                    r["run"] = run
                    s.many.append(r)
                    if r.get("errors"):
                        s.error = f"{opts.clients}-client round failed: {r['errors'][0]}"
            nxt += opts.clients
    return nxt


def profile(opts, target: System, ranks: list[int], out_dir: Path, tag: str, prompt0: int) -> dict:
    """py-spy (raw collapsed stacks, every thread) on the given ranks during 1-client traffic
    (distinct prompts from number ``prompt0`` on)."""
    spy = shutil.which("py-spy")
    if not spy:
        return {"error": "py-spy not found on PATH"}
    pids = [target.obj.group.procs[r].pid for r in ranks]
    files = [out_dir / f"pyspy-{tag}-rank{r}.txt" for r in ranks]
    idle = ["--idle"] if opts.profile_idle else []
    procs = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(opts.profile)),
                "--rate",
                "500",
                "--nonblocking",
                "--threads",
                *idle,
                "--format",
                "raw",
                "--output",
                str(f),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid, f in zip(pids, files)
    ]
    time.sleep(1.0)  # py-spy attaches
    n, tokens = 0, 0
    c0 = rb.procs_cpu_s(target.pids)
    t_end = time.monotonic() + opts.profile - 1.5
    while time.monotonic() < t_end:
        r = target.one_client(opts, prompt0 + n)
        n += 1
        tokens += r.get("completion_tokens") or 0
    cpu = rb.procs_cpu_s(target.pids) - c0
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=opts.profile + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode:
            errs.append(err[-500:])
    return {
        "requests": n,
        "tokens": tokens,
        "cpu_ms_per_token": 1000 * cpu / tokens if tokens else None,
        "files": [f.name for f in files if f.is_file()],
        "errors": errs or None,
        "top": {f.name: top_frames(f) for f in files if f.is_file()},
    }


def top_frames(path: Path, n: int = 15) -> dict:
    """Per thread: total samples and the functions with the most samples on top of the stack."""
    threads: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread") else "?"
        t = threads.setdefault(thread, {"samples": 0, "self": {}})
        t["samples"] += int(count)
        leaf = frames[-1]
        t["self"][leaf] = t["self"].get(leaf, 0) + int(count)
    return {
        k: {"samples": v["samples"], "self": sorted(v["self"].items(), key=lambda kv: -kv[1])[:n]}
        for k, v in threads.items()
    }


# --------------------------------------------------------------------------------------
# the modes
# --------------------------------------------------------------------------------------
def close_all(closers: list) -> None:
    """Stop every system started (last first); one that fails to stop does not stop the rest."""
    for close in reversed(closers):
        try:
            close()
        except Exception:
            pass


def run_single(opts, model: Path, workdir: Path, res: dict) -> list[System]:
    opts.ranks, opts.parallel = 1, "tensor"
    systems: list[System] = []
    closers = []
    try:
        base = Baseline(opts, model, workdir)
        closers.append(base.close)
        prompts = rb.model_prompts(model)
        res["prompts"] = {"kind": "distinct", "tokens": prompts.length, "first": prompts.take(0, 2)}
        systems.append(System("in-process", "inproc", base))
        systems.append(System("in-process batch-1", "inproc-b1", base))
        ours = Ours("runtime", model, workdir, 1, "ring")
        closers.append(ours.close)
        systems.append(System("runtime", "ours", ours, ours.model_id, prompts))
        for spec in opts.variant:
            name, _, folder = spec.partition("=")
            other = Ours(name, model, workdir, 1, "ring", pythonpath=str(Path(folder).resolve()))
            closers.append(other.close)
            systems.append(System(name, "ours", other, other.model_id, prompts))
        if not opts.skip_peer:
            peer = Peer(opts, model, workdir)
            closers.append(peer.close)
            systems.append(System("mlx_lm.server", "peer", peer, "default_model", prompts))
        if not opts.skip_cached:  # the same processes, sent one fixed prompt: the cache-on rows
            systems.append(System("runtime, repeated prompt", "ours", ours, ours.model_id, same=True))
            if not opts.skip_peer:
                systems.append(System("mlx_lm.server, repeated prompt", "peer", peer, "default_model", same=True))
        for s in systems:
            try:
                if s.kind != "inproc-b1" and not s.same:  # those share the processes of another system
                    s.obj.wait_ready(opts.start_timeout)
            except Exception as exc:
                s.error = f"start-up failed: {type(exc).__name__}: {exc}"
                res.setdefault("logs", {})[s.name] = sys_logs(s)
            if s.kind == "peer":
                s.obj.pause()
        nxt = rounds(systems, opts)
        ours_sys = systems[2]
        if opts.profile and ours_sys.error is None:
            rb.log(f"py-spy on the runtime's rank 0 for {opts.profile} s of 1-client traffic")
            res["profile"] = {"runtime": profile(opts, ours_sys, [0], opts.out.parent, "single", nxt)}
    finally:
        close_all(closers)
    return systems


NCCL_SMOKE = """
import mlx.core as mx
g = mx.distributed.init(backend="nccl", strict=True)
y = mx.distributed.all_sum(mx.ones((4,)) * (g.rank() + 1), group=g)
mx.eval(y)
print("rank", g.rank(), "of", g.size(), "all_sum on the GPU stream:", y.tolist(), flush=True)
z = mx.distributed.all_sum(mx.array(1.0), group=g, stream=mx.cpu)
mx.eval(z)
print("rank", g.rank(), "all_sum with stream=mx.cpu:", z.item(), flush=True)
"""


def nccl_smoke(ranks: int) -> dict:
    """Two bare MLX processes on the nccl backend: a GPU all_sum, then one on the CPU stream
    (what mlx-lm's sharded_load uses as its barrier)."""
    from mlx_jaccl_cluster.launch import free_ports

    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env |= {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port), "MLX_WORLD_SIZE": str(ranks)}
    # one GPU a process, as mjc-rank does for nccl (see main._pin_cuda_device)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", NCCL_SMOKE],
            text=True,
            env=env | {"MLX_RANK": str(r), "CUDA_VISIBLE_DEVICES": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(ranks)
    ]
    out = []
    for r, p in enumerate(procs):
        try:
            text, _ = p.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append({"rank": r, "rc": p.returncode, "output": text[-1500:]})
    return {"ranks": out}


def run_tp(opts, model: Path, workdir: Path, res: dict) -> list[System]:
    systems: list[System] = []
    closers = []
    try:
        prompts = rb.model_prompts(model)
        res["prompts"] = {"kind": "distinct", "tokens": prompts.length, "first": prompts.take(0, 2)}
        if not opts.skip_one_rank:
            one = Ours("runtime-1", model, workdir, 1, "ring")
            closers.append(one.close)
            systems.append(System("1 rank", "ours", one, one.model_id, prompts))
        many = Ours(f"runtime-{opts.ranks}", model, workdir, opts.ranks, opts.backend)
        closers.append(many.close)
        split = System(f"{opts.ranks} ranks {opts.backend}", "ours", many, many.model_id, prompts)
        systems.append(split)
        if not opts.skip_inproc:
            # mlx-lm in-process on the same splits (stream_generate / BatchGenerator): what MLX
            # itself gets from the split, and the same numerics as the runtime's ranks
            if not opts.skip_one_rank:
                opts1 = copy.copy(opts)
                opts1.ranks = 1
                (workdir / "inproc-1").mkdir(exist_ok=True)
                base1 = Baseline(opts1, model, workdir / "inproc-1")
                closers.append(base1.close)
                systems.append(System("in-process 1 rank", "inproc", base1))
            env = {"MJC_BENCH_BACKEND": opts.backend}
            if opts.backend == "nccl":
                from mlx_jaccl_cluster.launch import free_ports

                env |= {
                    "NCCL_HOST_IP": "127.0.0.1",
                    "NCCL_PORT": str(free_ports(1)[0]),
                    "MLX_WORLD_SIZE": str(opts.ranks),
                }
            (workdir / "inproc-n").mkdir(exist_ok=True)
            basen = Baseline(opts, model, workdir / "inproc-n", env=env)
            closers.append(basen.close)
            systems.append(System(f"in-process {opts.ranks} ranks {opts.backend}", "inproc", basen))
        for s in systems:
            t0 = time.monotonic()
            try:
                s.obj.wait_ready(opts.start_timeout)
                rb.log(f"{s.name}: ready after {time.monotonic() - t0:.0f} s")
            except Exception as exc:
                s.error = f"start-up failed: {type(exc).__name__}: {exc}"[:3000]
                res.setdefault("logs", {})[s.name] = sys_logs(s)
                rb.log(s.error)
        nxt = rounds(systems, opts)
        if opts.profile and split.error is None:
            rb.log(f"py-spy on ranks 0 and 1 ({opts.ranks} ranks) for {opts.profile} s of 1-client traffic")
            res["profile"] = {split.name: profile(opts, split, [0, 1], opts.out.parent, "tp", nxt)}
        for s in systems:
            if s.error and s.name not in res.get("logs", {}):
                res.setdefault("logs", {})[s.name] = sys_logs(s)
    finally:
        close_all(closers)
    return systems


# --------------------------------------------------------------------------------------
# long prompts among decoders
# --------------------------------------------------------------------------------------
def long_text(n_tokens: int, length_of, tag: int) -> str:
    """A user message of about ``n_tokens`` tokens (chat template included), its own for
    each ``tag`` from the first word on, so that no prompt cache holds any of it."""
    line = lambda j: (
        f"{tag} line {j}: the ranks share the work of every request and pass the partial "
        "results to each other over the network. "
    )
    lines = 16
    while length_of("".join(line(j) for j in range(lines))) < n_tokens:
        lines *= 2
    lo, hi = lines // 2, lines  # the fewest lines that reach n_tokens
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if length_of("".join(line(j) for j in range(mid))) >= n_tokens:
            hi = mid
        else:
            lo = mid
    return "".join(line(j) for j in range(hi))


def gaps_of(r: dict) -> list[tuple[float, float]]:
    """(end time, gap) of every inter-token interval of one streamed request."""
    t = r.get("times") or []
    return [(b, b - a) for a, b in zip(t, t[1:])]


def decoders_round(port: int, bodies: list[dict], long_body: dict | None, delay: float, opts) -> dict:
    """``bodies`` streamed together (every token's arrival kept); with ``long_body``, one
    more client sends it ``delay`` s after the others were released."""
    n = len(bodies)
    out: list[dict | None] = [None] * n
    long: dict = {}
    gate = threading.Barrier(n + (1 if long_body else 0))

    def worker(i: int) -> None:
        gate.wait(timeout=30)
        out[i] = rb.stream_chat(port, bodies[i], opts.io_timeout, opts.request_deadline, keep_times=True)

    def long_worker() -> None:
        gate.wait(timeout=30)
        time.sleep(delay)
        long.update(rb.stream_chat(port, long_body, opts.io_timeout, opts.request_deadline, keep_times=True))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    if long_body:
        threads.append(threading.Thread(target=long_worker, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=opts.request_deadline + opts.io_timeout + 30)
    done = [r for r in out if r is not None]
    errors = [r["error"] for r in done if r.get("error")] + ([long["error"]] if long.get("error") else [])
    if len(done) < n:
        errors.append(f"{n - len(done)} client thread(s) never returned")
    return {"decoders": done, "long": long or None, "errors": errors}


def round_times(rd: dict) -> dict:
    """When, in a loaded round, the long request was sent, got its first and last token, and
    where the longest gap of the decoders ended (seconds from the first decoder's sending):
    to place a stall."""
    decs = rd["decoders"]
    t0 = min(r["start"] for r in decs)
    long = rd.get("long") or {}
    worst = max(((t, g) for r in decs for t, g in gaps_of(r)), key=lambda tg: tg[1], default=(None, None))
    rel = lambda t: None if t is None else round(t - t0, 4)
    return {
        "long_sent": rel(long.get("start")),
        "long_first": rel((long.get("times") or [None])[0]),
        "long_last": rel((long.get("times") or [None])[-1]),
        "max_gap_end": rel(worst[0]),
        "max_gap_s": worst[1],
    }


def start_spy(pid: int, path: Path, seconds: int):
    spy = shutil.which("py-spy")
    if not spy:
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "500",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_spy(proc, seconds: int):
    try:
        _, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err[-500:] if proc.returncode else None


def itl_stats(gaps: list[float]) -> dict:
    from mlx_jaccl_cluster.bench import percentile

    if not gaps:
        return {"n": 0}
    return {
        "n": len(gaps),
        "p50_ms": 1000 * percentile(gaps, 50),
        "p99_ms": 1000 * percentile(gaps, 99),
        "max_ms": 1000 * max(gaps),
    }


def http_round_figures(rd: dict, tokens: int) -> dict:
    """A round's inter-token gaps (all; and, with a long prompt, those ending between its
    sending and its last token), the long prompt's TTFT and the aggregate rates."""
    decs = rd["decoders"]
    gaps = [g for r in decs for g in gaps_of(r)]
    start = min(r["start"] for r in decs)
    end = max(r["end"] for r in decs)
    dec_tokens = sum(r.get("completion_tokens") or 0 for r in decs)
    out = {
        "all": [g for _, g in gaps],
        "decode_tps": dec_tokens / (end - start) if end > start else None,
        "first_token_s": max((r.get("ttft_s") or 0) for r in decs),
    }
    long = rd.get("long")
    if long and long.get("times"):
        w0, w1 = long["start"], long["times"][-1]
        out["window"] = [g for t, g in gaps if w0 <= t <= w1]
        out["prefill_window"] = [g for t, g in gaps if w0 <= t <= long["start"] + long["ttft_s"]]
        out["long_ttft_s"] = long["ttft_s"]
        out["long_prompt_tokens"] = long.get("prompt_tokens")
        end = max(end, long["end"])
        out["aggregate_tps"] = (dec_tokens + (long.get("completion_tokens") or 0)) / (end - start)
    return out


def inproc_figures(r: dict, k: int) -> dict:
    """The same figures from :func:`baselines.interleave_steps` (a step = a token for each
    decoding sequence; its wall time is every decoder's inter-token gap)."""
    steps = r["steps"]
    full = [(b["t"], b["t"] - a["t"]) for a, b in zip(steps, steps[1:]) if b["short_tokens"] == k and a["short_tokens"]]
    out = {"all": [g for _, g in full]}
    if r.get("long_inserted_s") is not None and r.get("long_first_token_s") is not None:
        w0, w1 = r["long_inserted_s"], r["long_first_token_s"]
        out["prefill_window"] = [g for t, g in full if w0 <= t <= w1]
        out["long_ttft_s"] = w1 - w0
    return out


def run_interleave(opts, model: Path, workdir: Path, res: dict) -> list[System]:
    """7 clients decode (--decoders, --tokens each); an 8th sends a --long-tokens prompt once
    they all decode; the same 7 alone for comparison. The runtime at each --runtime-budgets
    (MJC_STEP_TOKEN_BUDGET) and --runtime-step-sizes (MJC_PREFILL_STEP_SIZE), mlx_lm.server, and mlx-lm's BatchGenerator in-process at each
    --step-sizes. Rounds alternate quiet and loaded."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    length_of = rb.prompt_counter(load_tokenizer(model))
    prompts = rb.Prompts(length_of)
    d = opts.decoders
    res["prompts"] = {"kind": "distinct", "tokens": prompts.length}
    closers: list = []
    systems: list[System] = []
    figures: dict = {}
    res["interleave"] = figures
    nxt = [0]

    def fresh(n: int) -> int:
        start = nxt[0]
        nxt[0] += n
        return start

    try:
        if not opts.skip_inproc:
            base = Baseline(opts, model, workdir)
            closers.append(base.close)
            systems.append(System("in-process", "inproc", base))

        def runtime(tag: str, label: str, env: dict[str, str]) -> None:
            """Our runtime with other settings, as one more system of the interleave run."""
            nccl = nccl_env(opts.ranks) if opts.backend == "nccl" else {}
            o = Ours(f"runtime-{tag}", model, workdir, opts.ranks, opts.backend, env=env | nccl)
            closers.append(o.close)
            systems.append(System(label, "ours", o, o.model_id, prompts))

        for size in opts.runtime_step_sizes:
            runtime(f"step{size}", f"runtime prefill_step_size {size}", {"MJC_PREFILL_STEP_SIZE": str(size)})
        for budget in opts.runtime_budgets:
            runtime(f"budget{budget}", f"runtime step_token_budget {budget}", {"MJC_STEP_TOKEN_BUDGET": str(budget)})
        for spec in opts.runtime_env:  # NAME:VAR=VALUE[,VAR=VALUE...]: the runtime with other settings
            name, _, pairs = spec.partition(":")
            runtime(name, f"runtime {name} ({pairs})", dict(kv.split("=", 1) for kv in pairs.split(",") if kv))
        if not opts.skip_peer:
            peer = Peer(opts, model, workdir)
            closers.append(peer.close)
            systems.append(System("mlx_lm.server", "peer", peer, "default_model", prompts))
        for s in systems:
            try:
                s.obj.wait_ready(opts.start_timeout)
            except Exception as exc:
                s.error = f"start-up failed: {type(exc).__name__}: {exc}"[:3000]
                res.setdefault("logs", {})[s.name] = sys_logs(s)
                rb.log(s.error)
            if s.kind == "peer":
                s.obj.pause()
        tag = [0]

        def long_for() -> str:
            tag[0] += 1
            return long_text(opts.long_tokens, length_of, 10_000 + tag[0])

        for s in systems:
            if s.error:
                continue
            rb.log(
                f"{s.name}: {d} decoders alone, then with a {opts.long_tokens}-token prompt, x {opts.interleave_rounds}"
            )
            f = figures[s.name] = {"rounds": []}
            try:
                if s.kind == "inproc":
                    for size in opts.step_sizes:
                        for rnd in range(opts.interleave_rounds + 1):  # round 0: warm-up
                            spec = {
                                "prompts": list(range(fresh(d), nxt[0])),
                                "tokens": opts.tokens,
                                "after": opts.after,
                                "long_max_tokens": opts.long_max_tokens,
                                "prefill_step_size": size,
                                "long_text": long_for(),
                            }
                            quiet = s.obj.interleave(spec | {"long": False}, opts.request_deadline * 2)
                            spec["prompts"] = list(range(fresh(d), nxt[0]))
                            loaded = s.obj.interleave(spec | {"long": True}, opts.request_deadline * 2)
                            if rnd:
                                f["rounds"].append(
                                    {
                                        "step_size": size,
                                        "quiet": inproc_figures(quiet, d),
                                        "loaded": inproc_figures(loaded, d),
                                        "long_prompt_tokens": loaded["long_prompt_tokens"],
                                    }
                                )
                    continue
                if s.kind == "peer":
                    s.obj.resume()
                s.tokens = opts.tokens
                long_body = lambda: rb.chat_body(s.model_id, opts.long_max_tokens, long_for())
                spy = None
                if opts.profile and s.kind == "ours" and not any("pyspy" in v for v in figures.values()):
                    spy = start_spy(
                        s.obj.group.procs[0].pid, opts.out.parent / "pyspy-interleave-rank0.txt", opts.profile
                    )
                    f["pyspy"] = "pyspy-interleave-rank0.txt"
                # warm-up: the shapes of a long prefill among decoders compile once
                warm = decoders_round(s.obj.port, s._bodies(fresh(d), d), long_body(), 0.05, opts)
                if warm["errors"]:
                    raise RuntimeError(f"warm-up: {warm['errors'][0]}")
                # and a quiet round: the delay below comes from the first measured quiet round,
                # which on a fresh machine once took 5.3 s to its first token (09:15 UTC,
                # docs/BENCHMARKS.md), sending the long prompt after the decoders had finished
                warm = decoders_round(s.obj.port, s._bodies(fresh(d), d), None, 0.0, opts)
                if warm["errors"]:
                    raise RuntimeError(f"warm-up: {warm['errors'][0]}")
                delay = None
                for _ in range(opts.interleave_rounds):
                    quiet = decoders_round(s.obj.port, s._bodies(fresh(d), d), None, 0.0, opts)
                    q = http_round_figures(quiet, opts.tokens)
                    if delay is None:  # the 8th arrives once all 7 decode, `after` tokens in
                        delay = q["first_token_s"] + opts.after * (statistics.median(q["all"]) if q["all"] else 0.01)
                    loaded = decoders_round(s.obj.port, s._bodies(fresh(d), d), long_body(), delay, opts)
                    errs = quiet["errors"] + loaded["errors"]
                    if errs:
                        raise RuntimeError(errs[0])
                    f["rounds"].append(
                        {
                            "quiet": q,
                            "loaded": http_round_figures(loaded, opts.tokens),
                            "delay_s": delay,
                            "times": round_times(loaded),
                        }
                    )
                if spy is not None:
                    f["pyspy_errors"] = stop_spy(spy, opts.profile)
            except Exception as exc:
                s.error = f"{type(exc).__name__}: {exc}"[:2000]
                f["error"] = s.error
                rb.log(f"{s.name}: {s.error}")
            finally:
                if s.kind == "peer":
                    s.obj.pause()
    finally:
        close_all(closers)
    for f in figures.values():
        f["summary"] = interleave_summary(f["rounds"])
    return []


def interleave_summary(rounds_: list[dict]) -> list[dict]:
    """Per prefill step size (in-process) or per system: pooled gaps' p50/p99, quiet vs loaded."""
    out = []
    for size in sorted({r.get("step_size") for r in rounds_}, key=lambda x: x or 0):
        rs = [r for r in rounds_ if r.get("step_size") == size]
        pool = lambda part, key: [g for r in rs for g in r[part].get(key) or []]
        quiet, window, pre = (
            itl_stats(pool("quiet", "all")),
            itl_stats(pool("loaded", "window")),
            itl_stats(pool("loaded", "prefill_window")),
        )
        loaded_all = itl_stats(pool("loaded", "all"))
        out.append(
            {
                "step_size": size,
                "quiet": quiet,
                "loaded_all": loaded_all,
                "loaded_window": window,
                "loaded_prefill_window": pre,
                "p99_ratio_prefill": ratio(pre.get("p99_ms"), quiet.get("p99_ms")),
                "p99_ratio_window": ratio(window.get("p99_ms"), quiet.get("p99_ms")),
                "p99_ratio_all": ratio(loaded_all.get("p99_ms"), quiet.get("p99_ms")),
                "long_ttft_ms": ms(rb.median([r["loaded"].get("long_ttft_s") for r in rs])),
                "quiet_decode_tps": rb.median([r["quiet"].get("decode_tps") for r in rs]),
                "loaded_decode_tps": rb.median([r["loaded"].get("decode_tps") for r in rs]),
                "loaded_aggregate_tps": rb.median([r["loaded"].get("aggregate_tps") for r in rs]),
                "long_prompt_tokens": sorted(
                    {r.get("long_prompt_tokens") or r["loaded"].get("long_prompt_tokens") for r in rs} - {None}
                ),
            }
        )
    return out


def nccl_env(ranks: int) -> dict:
    from mlx_jaccl_cluster.launch import free_ports

    return {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(free_ports(1)[0]), "MLX_WORLD_SIZE": str(ranks)}


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------
ratio, fmt = rb.ratio, rb.fmt


def verdict(r, target):
    return "-" if r is None else ("met" if r >= target else "MISSED")


def diff(a, b):
    return None if a is None or b is None else a - b


def run_ratios(x: dict, y: dict, key: str) -> list:
    """The ratio of ``key`` within each run (the runs' own medians)."""
    return [ratio(a.get(key), b.get(key)) for a, b in zip(x.get("per_run") or [], y.get("per_run") or [])]


def paired_text(x: dict, y: dict, runs: str, key: str, scale: float = 1.0, op=None) -> str:
    """'; paired 0.90 [0.74-1.01]': the median and quartiles of the per-round figure of x
    against y. Within a round the systems ran one after the other, so a pair shares the
    machine's state; on a noisy machine this is the steadier estimate of a ratio."""
    op = op or ratio
    pairs = [
        op(a.get(key) * scale, b.get(key) * scale)
        for a, b in zip(x.get(runs) or [], y.get(runs) or [])
        if a.get(key) is not None and b.get(key) is not None and not a.get("error") and not b.get("error")
    ]
    pairs = [v for v in pairs if v is not None]
    if len(pairs) < 4:
        return ""
    q = statistics.quantiles(pairs, n=4)
    return f"; paired {statistics.median(pairs):.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def spread_text(values: list) -> str:
    """' (runs 0.97 / 1.01 / 0.99)': each run's figure, the spread of a target's ratio."""
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return ""
    runs = " / ".join(f"{v:.2f}" for v in known)
    return f" (runs {runs}; spread {max(known) - min(known):.2f})"


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(opts, res: dict) -> list[dict]:
    s = res["systems"]
    rows = []
    if opts.mode == "single":
        inp, ours, peer = s.get("in-process", {}), s.get("runtime", {}), s.get("mlx_lm.server", {})
        c = opts.clients

        def target_row(label, x, y, key, op, goal):
            r = ratio(x.get(key), y.get(key))
            runs = run_ratios(x, y, key)
            spread = spread_text(runs)
            ok = None if r is None else r >= goal
            rows.append(
                [
                    label,
                    x.get(key),
                    y.get(key),
                    r,
                    f"{op} {goal}",
                    ("-" if ok is None else "met" if ok else "MISSED")
                    + spread
                    + paired_text(x, y, "many_runs" if key == "aggregate_tps" else "one_runs", key),
                ]
            )

        target_row(
            "runtime / in-process stream_generate, 1 client tok/s",
            ours,
            inp,
            "decode_tps",
            ">=",
            TARGETS["one_client_vs_inproc"],
        )
        target_row(
            f"runtime / in-process BatchGenerator, {c} clients aggregate tok/s",
            ours,
            inp,
            "aggregate_tps",
            ">=",
            TARGETS["concurrent_vs_inproc_batch"],
        )
        target_row(
            "runtime / mlx_lm.server, 1 client tok/s", ours, peer, "decode_tps", ">=", TARGETS["one_client_vs_peer"]
        )
        target_row(
            f"runtime / mlx_lm.server, {c} clients aggregate tok/s",
            ours,
            peer,
            "aggregate_tps",
            ">=",
            TARGETS["concurrent_vs_peer"],
        )
        d = diff(ours.get("ttft_ms"), inp.get("ttft_ms"))
        runs = [
            diff(a.get("ttft_ms"), b.get("ttft_ms"))
            for a, b in zip(ours.get("per_run") or [], inp.get("per_run") or [])
        ]
        rows.append(
            [
                "TTFT ms, 1 client: runtime - in-process",
                ours.get("ttft_ms"),
                inp.get("ttft_ms"),
                d,
                f"<= {TARGETS['ttft_delta_ms']} ms",
                ("-" if d is None else "met" if d <= TARGETS["ttft_delta_ms"] else "MISSED")
                + spread_text(runs)
                + paired_text(ours, inp, "one_runs", "ttft_s", scale=1000, op=diff),
            ]
        )
        b1 = s.get("in-process batch-1", {})
        rows.append(
            [
                "runtime / in-process BatchGenerator 1 seq (incl. prefill), 1 client tok/s",
                ours.get("decode_tps"),
                b1.get("decode_tps"),
                ratio(ours.get("decode_tps"), b1.get("decode_tps")),
                "(info)",
                "info" + spread_text(run_ratios(ours, b1, "decode_tps")),
            ]
        )
        rows.append(
            [
                "TTFT ms, 1 client: in-process BatchGenerator 1 seq - stream_generate (the engine's share)",
                b1.get("ttft_ms"),
                inp.get("ttft_ms"),
                diff(b1.get("ttft_ms"), inp.get("ttft_ms")),
                "(info)",
                "info",
            ]
        )
        rows.append(
            [
                "TTFT ms, 1 client: runtime / mlx_lm.server",
                ours.get("ttft_ms"),
                peer.get("ttft_ms"),
                ratio(ours.get("ttft_ms"), peer.get("ttft_ms")),
                "(info)",
                "info",
            ]
        )
        for name, ref in (("runtime, repeated prompt", ours), ("mlx_lm.server, repeated prompt", peer)):
            x = s.get(name)
            if not x:
                continue
            rows.append(
                [
                    f"cache on: {name} / distinct prompts, 1 client tok/s",
                    x.get("decode_tps"),
                    ref.get("decode_tps"),
                    ratio(x.get("decode_tps"), ref.get("decode_tps")),
                    "(info)",
                    f"cached tokens {fmt(x.get('cached_tokens_median'))} vs {fmt(ref.get('cached_tokens_median'))}",
                ]
            )
            rows.append(
                [
                    f"cache on: {name}, TTFT ms - in-process (distinct)",
                    x.get("ttft_ms"),
                    inp.get("ttft_ms"),
                    diff(x.get("ttft_ms"), inp.get("ttft_ms")),
                    "(info)",
                    "info",
                ]
            )
        rows.append(
            [
                "prompt tokens per request (all systems, distinct prompts)",
                ", ".join(f"{n}: {v.get('prompt_tokens')}" for n, v in s.items() if "repeated" not in n),
                None,
                None,
                "one length",
                "info",
            ]
        )
        for spec in opts.variant:
            name = spec.partition("=")[0]
            b = s.get(name, {})
            rows.append(
                [
                    f"runtime / {name}, 1 client tok/s",
                    ours.get("decode_tps"),
                    b.get("decode_tps"),
                    ratio(ours.get("decode_tps"), b.get("decode_tps")),
                    "(change)",
                    "info",
                ]
            )
            rows.append(
                [
                    f"runtime / {name}, {c} clients tok/s",
                    ours.get("aggregate_tps"),
                    b.get("aggregate_tps"),
                    ratio(ours.get("aggregate_tps"), b.get("aggregate_tps")),
                    "(change)",
                    "info",
                ]
            )
        texts = {n: v.get("text0") for n, v in s.items() if v.get("text0") and "repeated" not in n}
        ref = texts.get("in-process", "")
        differ = [n for n, t in texts.items() if t != ref]
        rows.append(
            [
                "greedy 1-client text identical to in-process stream_generate",
                len(texts) - len(differ),
                len(texts),
                None,
                "all",
                "met" if ref and not differ else "differ: " + ", ".join(differ),
            ]
        )
    elif opts.mode == "interleave":
        goal = TARGETS["interleave_p99_vs_quiet"]
        for name, f in (res.get("interleave") or {}).items():
            if f.get("error"):
                rows.append([f"{name}: failed", None, None, None, "-", f["error"][:120]])
            for x in f.get("summary") or []:
                label = name + (f" (prefill_step_size {x['step_size']})" if x.get("step_size") else "")
                q, w, j = x["quiet"], x["loaded_prefill_window"], x["loaded_window"]
                r = x["p99_ratio_prefill"]
                rows.append(
                    [
                        f"{label}: ITL p99 ms, {opts.decoders} decoders during the long prefill / alone",
                        w.get("p99_ms"),
                        q.get("p99_ms"),
                        r,
                        f"<= {goal}",
                        "-" if r is None else ("met" if r <= goal else "MISSED"),
                    ]
                )
                rows.append(
                    [
                        f"{label}: ITL p50 ms during the prefill / alone; max ms during; gaps counted",
                        w.get("p50_ms"),
                        q.get("p50_ms"),
                        ratio(w.get("p50_ms"), q.get("p50_ms")),
                        "(info)",
                        f"max {fmt(w.get('max_ms'))} ms; {w.get('n')} gaps during, {q.get('n')} alone",
                    ]
                )
                if j.get("n"):
                    rows.append(
                        [
                            f"{label}: ITL p99 ms from the long request's sending to its last token / alone",
                            j.get("p99_ms"),
                            q.get("p99_ms"),
                            x["p99_ratio_window"],
                            "(info)",
                            f"max {fmt(j.get('max_ms'))} ms (its prefill, joining the batch, decoding, leaving)",
                        ]
                    )
                rows.append(
                    [
                        f"{label}: long prompt TTFT ms ({'/'.join(map(str, x['long_prompt_tokens']))} tokens); "
                        "decode tok/s of the decoders, loaded / alone",
                        x.get("long_ttft_ms"),
                        x.get("loaded_decode_tps"),
                        x.get("quiet_decode_tps"),
                        "(info)",
                        "decode ratio "
                        + fmt(ratio(x.get("loaded_decode_tps"), x.get("quiet_decode_tps")), 2)
                        + "; aggregate incl. the 8th "
                        + fmt(x.get("loaded_aggregate_tps")),
                    ]
                )
        return rows
    else:
        one, many = s.get("1 rank", {}), s.get(f"{opts.ranks} ranks {opts.backend}", {})
        i1, iN = s.get("in-process 1 rank", {}), s.get(f"in-process {opts.ranks} ranks {opts.backend}", {})
        n, c = opts.ranks, opts.clients
        for label, x, y, key, note in (
            (f"{n} ranks / 1 rank, 1 client tok/s", many, one, "decode_tps", "(scaling)"),
            (f"{n} ranks / 1 rank, {c} clients aggregate tok/s", many, one, "aggregate_tps", "(scaling)"),
            (f"TTFT ms, 1 client: {n} ranks / 1 rank", many, one, "ttft_ms", "(info)"),
            (f"in-process {n} ranks / 1 rank, 1 client tok/s", iN, i1, "decode_tps", "(MLX's own scaling)"),
            (
                f"in-process {n} ranks / 1 rank, {c} seqs aggregate tok/s",
                iN,
                i1,
                "aggregate_tps",
                "(MLX's own scaling)",
            ),
            (f"runtime / in-process, {n} ranks, 1 client tok/s", many, iN, "decode_tps", "(info)"),
        ):
            rows.append([label, x.get(key), y.get(key), ratio(x.get(key), y.get(key)), note, "info"])
        for label, x, y in (
            ("runtime: greedy text, N ranks vs 1 rank", many, one),
            ("runtime vs in-process, N ranks (same split)", many, iN),
            ("runtime vs in-process, 1 rank", one, i1),
        ):
            a, b = y.get("text0") or "", x.get("text0") or ""
            rows.append(
                [
                    label + " (chars in common / total)",
                    common_prefix(a, b),
                    len(a),
                    None,
                    "identical",
                    "-" if not a or not b else ("identical" if a == b else "differ"),
                ]
            )
    for name, v in s.items():
        rows.append(
            [
                f"  {name}: 1 client tok/s | {opts.clients} clients tok/s | TTFT ms | CPU ms/token",
                v.get("decode_tps"),
                v.get("aggregate_tps"),
                v.get("ttft_ms"),
                v.get("cpu_ms_per_token"),
                v.get("error") or "",
            ]
        )
    return rows


def print_table(res: dict) -> None:
    head = ["metric", "value", "reference", "ratio", "target", "verdict"]
    cells = [[r[0], fmt(r[1]), fmt(r[2]), fmt(r[3], 2), fmt(r[4], 2), str(r[5])[:120]] for r in res["summary"]]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"
    m = res["machine"]
    print()
    print(
        f"{res['mode']}: model {res['model']['name']} ({res['model']['parameters'] / 1e6:.0f}M params, "
        f"{res['model']['bytes'] / 2**30:.2f} GiB), {res['args']['tokens']} tokens, repeats {res['args']['repeats']}"
        f"/{res['args']['concurrent_repeats']}, {res['args']['clients']} clients; {m.get('gpu')}; mlx {m['mlx']} "
        f"({m.get('device')}), mlx-lm {m['mlx_lm']}; {res['date']}"
    )
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    if res.get("crash"):
        print("CRASH: " + res["crash"][-1500:])


def machine_info() -> dict:
    import mlx.core as mx
    import mlx_lm

    info = {
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "cores": os.cpu_count(),
        "cpu": rb._lscpu_model(),
    }
    try:
        info["gpu"] = "; ".join(
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def report(path: Path) -> int:
    """Print the table of a saved result again (with the current summary code)."""
    res = json.loads(path.read_text())
    opts = argparse.Namespace(**res["args"])
    for f in (res.get("interleave") or {}).values():
        f["summary"] = interleave_summary(f["rounds"])
    res["summary"] = summarize(opts, res)
    print_table(res)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--report"]:
        return report(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="gpu_bench.py --report RESULT.json prints the table of a saved result again",
    )
    ap.add_argument("mode", choices=["single", "tp", "interleave"])
    ap.add_argument("--model", type=Path, help="an existing mlx-lm folder instead of building one")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="772m", help="llama shape preset (default 772m)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--ranks", type=int, default=2, help="tp: ranks of the split group (default 2)")
    ap.add_argument("--backend", choices=["nccl", "ring"], default="nccl", help="tp: backend of the split group")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="single: also measure the mlx_jaccl_cluster package in DIR under NAME (repeatable)",
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-inproc", action="store_true", help="tp, interleave: no in-process mlx-lm baselines")
    ap.add_argument(
        "--skip-one-rank", action="store_true", help="tp: only the split (runtime and in-process), no 1-rank systems"
    )
    ap.add_argument("--skip-cached", action="store_true", help="single: no repeated-prompt (cache-on) rows")
    ap.add_argument(
        "--peer-prompt-cache",
        type=int,
        default=None,
        help="mlx_lm.server --prompt-cache-size (default: its own, as the runtime runs with its own)",
    )
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9, help="1-client rounds per run")
    ap.add_argument("--concurrent-repeats", type=int, default=9, help="N-client rounds per run")
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs (each --repeats and --concurrent-repeats rounds); the table gives each run's ratio and their spread",
    )
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--decoders", type=int, default=7, help="interleave: clients decoding")
    ap.add_argument("--long-tokens", type=int, default=8192, help="interleave: the long prompt's tokens")
    ap.add_argument("--long-max-tokens", type=int, default=8, help="interleave: max_tokens of the long request")
    ap.add_argument("--after", type=int, default=16, help="interleave: decode steps before the long prompt arrives")
    ap.add_argument("--interleave-rounds", type=int, default=3, help="interleave: quiet + loaded pairs per system")
    ap.add_argument(
        "--step-sizes",
        type=int,
        nargs="+",
        default=[256, 512, 2048, 8192],
        help="interleave: in-process BatchGenerator prefill_step_size values",
    )
    ap.add_argument(
        "--runtime-budgets",
        type=int,
        nargs="*",
        default=[512, 2048],
        help="interleave: the runtime's MJC_STEP_TOKEN_BUDGET values (tokens a step runs: decoders + prefill; "
        "512 is its default)",
    )
    ap.add_argument(
        "--runtime-step-sizes",
        type=int,
        nargs="*",
        default=[],
        help="interleave: the runtime's MJC_PREFILL_STEP_SIZE values (the largest forward piece of a chunk; "
        "before step_token_budget it was the chunk per waiting prompt and step)",
    )
    ap.add_argument(
        "--runtime-env",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="interleave: also the runtime with these settings, e.g. nocache:MJC_PROMPT_CACHE_SIZE=0",
    )
    ap.add_argument("--profile", type=int, default=0, help="seconds of py-spy on the runtime (0: none)")
    ap.add_argument(
        "--profile-idle",
        action="store_true",
        help="py-spy records waiting threads too (where a rank waits: for the STEP frame, in a collective)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mjc-gpu-bench"))
    ap.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    ap.add_argument("--io-timeout", type=float, default=120.0)
    ap.add_argument("--request-deadline", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    opts = ap.parse_args()
    opts.parallel = "tensor"
    if opts.mode == "single" or (opts.mode == "interleave" and "--ranks" not in sys.argv):
        opts.ranks = 1

    def interrupt(signum, frame):  # stop every system started (the finally blocks), also when killed
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    res: dict = {
        "mode": opts.mode,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "targets": TARGETS,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "systems": {},
    }
    systems: list[System] = []
    try:
        res["machine"] = machine_info()
        if opts.mode == "tp" and opts.backend == "nccl":
            res["nccl_smoke"] = nccl_smoke(opts.ranks)
            for r in res["nccl_smoke"]["ranks"]:
                rb.log(f"nccl smoke, rank {r['rank']} rc={r['rc']}: {r['output'][-600:]}")
        model, origin = build_model(opts, workdir)
        res["model"] = {"name": model.name, "path": str(model), "bytes": rb.model_bytes(model), **origin}
        run = {"single": run_single, "tp": run_tp, "interleave": run_interleave}[opts.mode]
        systems = run(opts, model, workdir, res)
    except BaseException:
        res["crash"] = traceback.format_exc()
        rb.log(res["crash"])
    res["systems"] = {
        s.name: s.summary() | {"one_runs": s.one, "many_runs": s.many, "warmup": s.warmup} for s in systems
    }
    res.setdefault("model", {"name": "?", "parameters": 0, "bytes": 0})
    res.setdefault("machine", {"mlx": "?", "mlx_lm": "?"})
    res["summary"] = summarize(opts, res)
    res["total_s"] = round(time.monotonic() - started, 1)
    opts.out.write_text(json.dumps(res, indent=1, default=str))
    for name, logs in (res.get("logs") or {}).items():
        for rank, text in logs.items():
            print(f"--- {name} rank {rank} log (tail) ---\n{text[-1500:]}")
    print_table(res)
    print(f"raw results: {opts.out} (total {res['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
