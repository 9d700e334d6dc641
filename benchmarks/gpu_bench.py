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

The process pieces (in-process baseline, mlx_lm.server, HTTP client) are those of
``benchmarks/runtime_bench.py``. Writes every raw figure to ``--out`` (JSON) and prints
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
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime_bench as rb  # noqa: E402

TARGETS = {
    "one_client_vs_inproc": 0.95,  # runtime decode tok/s / in-process stream_generate
    "concurrent_vs_inproc_batch": 0.90,  # runtime aggregate tok/s / in-process BatchGenerator
    "one_client_vs_peer": 1.8,  # runtime decode tok/s / mlx_lm.server
}

SHAPES = {  # --shape presets; each flag below overrides one field
    "772m": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5120, num_attention_heads=16,
                 num_key_value_heads=16),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
               num_key_value_heads=8),
    "cpu": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, num_attention_heads=8,
                num_key_value_heads=8),
}


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------
def build_model(opts, workdir: Path) -> tuple[Path, dict]:
    if opts.model:
        return opts.model.resolve(), {"source": str(opts.model)}
    shape = dict(SHAPES[opts.shape])
    for key, flag in (("hidden_size", "hidden_size"), ("num_hidden_layers", "layers"),
                      ("intermediate_size", "intermediate_size"), ("num_attention_heads", "heads"),
                      ("num_key_value_heads", "kv_heads")):
        if getattr(opts, flag) is not None:
            shape[key] = getattr(opts, flag)
    tag = f"{opts.shape}-{opts.dtype}-" + "-".join(f"{v}" for _, v in sorted(shape.items()))
    out = workdir / "models" / f"llama-{tag}"
    t0 = time.monotonic()
    if not (out / "config.json").is_file():
        # in a child process, so that this one holds no GPU memory afterwards
        code = ("import sys, json; from mlx_jaccl_cluster.models import build_tiny_model; "
                "build_tiny_model(sys.argv[1], arch='llama', dtype=sys.argv[2], **json.loads(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, str(out), opts.dtype, json.dumps(shape)], check=True)
    config = json.loads((out / "config.json").read_text())
    params = param_count(out)
    rb.log(f"model {out.name}: {params / 1e6:.0f}M parameters, {rb.model_bytes(out) / 2**30:.2f} GiB "
           f"({time.monotonic() - t0:.0f} s)")
    return out, {"source": f"build_tiny_model(arch='llama', dtype={opts.dtype!r}, {shape})", "parameters": params,
                 "config": config}


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

    def __init__(self, name: str, model: Path, workdir: Path, ranks: int, backend: str, pythonpath: str | None = None):
        from mlx_jaccl_cluster.launch import free_ports, start_group

        self.name = name
        env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")
        if backend == "nccl":
            (port,) = free_ports(1)
            env |= {"MJC_BACKEND": "nccl", "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port),
                    "MLX_WORLD_SIZE": str(ranks)}
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
    """One thing measured: how to send it one request and one N-client round."""

    def __init__(self, name: str, kind: str, obj, body: dict | None = None):
        self.name, self.kind, self.obj, self.body = name, kind, obj, body
        self.one: list[dict] = []
        self.many: list[dict] = []
        self.warmup: dict = {}
        self.error: str | None = None

    @property
    def pids(self) -> list[int]:
        return self.obj.pids

    def one_client(self, opts) -> dict:
        if self.kind == "inproc":
            return self.obj.run_once(opts.request_deadline)
        if self.kind == "inproc-b1":
            r = self.obj.run_batch(1, opts.request_deadline)
            return r | {"decode_tps": r["aggregate_tps"]}
        if self.kind == "peer":
            self.obj.resume()
        try:
            return rb.strip(rb.stream_chat(self.obj.port, self.body, opts.io_timeout, opts.request_deadline))
        finally:
            if self.kind == "peer":
                self.obj.pause()

    def clients(self, opts) -> dict:
        if self.kind == "inproc":
            return self.obj.run_batch(opts.clients, opts.request_deadline * 2)
        if self.kind == "peer":
            self.obj.resume()
        try:
            return rb.concurrent(self.obj.port, self.body, opts.clients, opts.io_timeout, opts.request_deadline)
        finally:
            if self.kind == "peer":
                self.obj.pause()

    def summary(self) -> dict:
        ok = [r for r in self.one if not r.get("error")]
        many = [r for r in self.many if not r.get("errors")]
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
            "text0": ok[0].get("text", "") if ok else "",
        }
        return out


def sys_logs(s: "System") -> dict:
    if s.kind == "ours":
        return s.obj.logs()
    return {r: rb.tail(f) for r, f in enumerate(getattr(s.obj, "logs", []))}


def ms(x):
    return None if x is None else x * 1000


def rounds(systems: list[System], opts) -> None:
    """Warm-up, then 1-client rounds and N-client rounds, the order rotating each round."""
    live = [s for s in systems if s.error is None]
    for s in live:
        rb.log(f"{s.name}: warm-up (1 client, then {opts.clients} clients)")
        try:
            w1 = s.one_client(opts)
            wn = s.clients(opts) if opts.clients and s.kind != "inproc-b1" else {}
            s.warmup = {"one": w1, "many": {k: v for k, v in wn.items() if k != "text0"}}
            err = w1.get("error") or (wn.get("errors") or [None])[0]
            if err:
                s.error = f"warm-up failed: {err}"
        except Exception as exc:
            s.error = f"warm-up failed: {type(exc).__name__}: {exc}"
    live = [s for s in systems if s.error is None]
    rb.log(f"1 client x {opts.repeats}: " + ", ".join(s.name for s in live))
    for i in range(opts.repeats):
        k = i % len(live)
        for s in live[k:] + live[:k]:
            if s.error is None:
                r = rb.with_cpu(lambda: s.one_client(opts), s.pids)
                s.one.append(r)
                if r.get("error"):
                    s.error = f"1-client request failed: {r['error']}"
    if not opts.clients:
        return
    rb.log(f"{opts.clients} clients x {opts.concurrent_repeats}: " + ", ".join(s.name for s in live))
    for i in range(opts.concurrent_repeats):
        k = i % len(live)
        for s in live[k:] + live[:k]:
            if s.error is None and s.kind != "inproc-b1":
                r = s.clients(opts)
                r.pop("text0", None)
                s.many.append(r)
                if r.get("errors"):
                    s.error = f"{opts.clients}-client round failed: {r['errors'][0]}"


def profile(opts, target: System, ranks: list[int], out_dir: Path, tag: str) -> dict:
    """py-spy (raw collapsed stacks, every thread) on the given ranks during 1-client traffic."""
    spy = shutil.which("py-spy")
    if not spy:
        return {"error": "py-spy not found on PATH"}
    pids = [target.obj.group.procs[r].pid for r in ranks]
    files = [out_dir / f"pyspy-{tag}-rank{r}.txt" for r in ranks]
    procs = [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(opts.profile)), "--rate", "500",
                               "--nonblocking", "--threads", "--format", "raw", "--output", str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for pid, f in zip(pids, files)]
    time.sleep(1.0)  # py-spy attaches
    n, tokens = 0, 0
    c0 = rb.procs_cpu_s(target.pids)
    t_end = time.monotonic() + opts.profile - 1.5
    while time.monotonic() < t_end:
        r = target.one_client(opts)
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
    return {"requests": n, "tokens": tokens, "cpu_ms_per_token": 1000 * cpu / tokens if tokens else None,
            "files": [f.name for f in files if f.is_file()], "errors": errs or None,
            "top": {f.name: top_frames(f) for f in files if f.is_file()}}


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
    return {k: {"samples": v["samples"], "self": sorted(v["self"].items(), key=lambda kv: -kv[1])[:n]}
            for k, v in threads.items()}


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
        base = rb.Baseline(opts, model, workdir)
        closers.append(base.close)
        systems.append(System("in-process", "inproc", base))
        systems.append(System("in-process batch-1", "inproc-b1", base))
        ours = Ours("runtime", model, workdir, 1, "ring")
        closers.append(ours.close)
        systems.append(System("runtime", "ours", ours, rb.chat_body(ours.model_id, opts.tokens)))
        for spec in opts.variant:
            name, _, folder = spec.partition("=")
            other = Ours(name, model, workdir, 1, "ring", pythonpath=str(Path(folder).resolve()))
            closers.append(other.close)
            systems.append(System(name, "ours", other, rb.chat_body(other.model_id, opts.tokens)))
        if not opts.skip_peer:
            peer = rb.Peer(opts, model, workdir)
            closers.append(peer.close)
            systems.append(System("mlx_lm.server", "peer", peer, rb.chat_body("default_model", opts.tokens)))
        for s in systems:
            try:
                if s.kind != "inproc-b1":
                    s.obj.wait_ready(opts.start_timeout)
            except Exception as exc:
                s.error = f"start-up failed: {type(exc).__name__}: {exc}"
                res.setdefault("logs", {})[s.name] = sys_logs(s)
            if s.kind == "peer":
                s.obj.pause()
        rounds(systems, opts)
        ours_sys = systems[2]
        if opts.profile and ours_sys.error is None:
            rb.log(f"py-spy on the runtime's rank 0 for {opts.profile} s of 1-client traffic")
            res["profile"] = {"runtime": profile(opts, ours_sys, [0], opts.out.parent, "single")}
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
    procs = [subprocess.Popen([sys.executable, "-c", NCCL_SMOKE], text=True,
                              env=env | {"MLX_RANK": str(r), "CUDA_VISIBLE_DEVICES": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(ranks)]
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
        one = Ours("runtime-1", model, workdir, 1, "ring")
        closers.append(one.close)
        many = Ours(f"runtime-{opts.ranks}", model, workdir, opts.ranks, opts.backend)
        closers.append(many.close)
        systems = [System("1 rank", "ours", one, rb.chat_body(one.model_id, opts.tokens)),
                   System(f"{opts.ranks} ranks {opts.backend}", "ours", many, rb.chat_body(many.model_id, opts.tokens))]
        if not opts.skip_inproc:
            # mlx-lm in-process on the same splits (stream_generate / BatchGenerator): what MLX
            # itself gets from the split, and the same numerics as the runtime's ranks
            opts1 = copy.copy(opts)
            opts1.ranks = 1
            (workdir / "inproc-1").mkdir(exist_ok=True)
            base1 = rb.Baseline(opts1, model, workdir / "inproc-1")
            closers.append(base1.close)
            env = {"MJC_BENCH_BACKEND": opts.backend}
            if opts.backend == "nccl":
                from mlx_jaccl_cluster.launch import free_ports

                env |= {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(free_ports(1)[0]), "MLX_WORLD_SIZE": str(opts.ranks)}
            (workdir / "inproc-n").mkdir(exist_ok=True)
            basen = rb.Baseline(opts, model, workdir / "inproc-n", env=env)
            closers.append(basen.close)
            systems += [System("in-process 1 rank", "inproc", base1),
                        System(f"in-process {opts.ranks} ranks {opts.backend}", "inproc", basen)]
        for s in systems:
            t0 = time.monotonic()
            try:
                s.obj.wait_ready(opts.start_timeout)
                rb.log(f"{s.name}: ready after {time.monotonic() - t0:.0f} s")
            except Exception as exc:
                s.error = f"start-up failed: {type(exc).__name__}: {exc}"[:3000]
                res.setdefault("logs", {})[s.name] = sys_logs(s)
                rb.log(s.error)
        rounds(systems, opts)
        if opts.profile and systems[1].error is None:
            rb.log(f"py-spy on ranks 0 and 1 ({opts.ranks} ranks) for {opts.profile} s of 1-client traffic")
            res["profile"] = {systems[1].name: profile(opts, systems[1], [0, 1], opts.out.parent, "tp")}
        for s in systems:
            if s.error and s.name not in res.get("logs", {}):
                res.setdefault("logs", {})[s.name] = sys_logs(s)
    finally:
        close_all(closers)
    return systems


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------
ratio, fmt = rb.ratio, rb.fmt


def verdict(r, target):
    return "-" if r is None else ("met" if r >= target else "MISSED")


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
        r = ratio(ours.get("decode_tps"), inp.get("decode_tps"))
        rows.append(["runtime / in-process stream_generate, 1 client tok/s", ours.get("decode_tps"), inp.get("decode_tps"),
                     r, ">= 0.95", verdict(r, 0.95)])
        r = ratio(ours.get("aggregate_tps"), inp.get("aggregate_tps"))
        rows.append([f"runtime / in-process BatchGenerator, {opts.clients} clients aggregate tok/s", ours.get("aggregate_tps"),
                     inp.get("aggregate_tps"), r, ">= 0.90", verdict(r, 0.90)])
        r = ratio(ours.get("decode_tps"), peer.get("decode_tps"))
        rows.append(["runtime / mlx_lm.server, 1 client tok/s", ours.get("decode_tps"), peer.get("decode_tps"), r, ">= 1.8",
                     verdict(r, 1.8)])
        r = ratio(ours.get("aggregate_tps"), peer.get("aggregate_tps"))
        rows.append([f"runtime / mlx_lm.server, {opts.clients} clients aggregate tok/s", ours.get("aggregate_tps"),
                     peer.get("aggregate_tps"), r, "(info)", "info"])
        b1 = s.get("in-process batch-1", {})
        rows.append(["runtime / in-process BatchGenerator 1 seq (incl. prefill), 1 client tok/s", ours.get("decode_tps"),
                     b1.get("decode_tps"), ratio(ours.get("decode_tps"), b1.get("decode_tps")), "(info)", "info"])
        rows.append(["TTFT ms, 1 client: runtime / in-process", ours.get("ttft_ms"), inp.get("ttft_ms"),
                     ratio(ours.get("ttft_ms"), inp.get("ttft_ms")), "(info)", "info"])
        rows.append(["TTFT ms, 1 client: runtime / mlx_lm.server", ours.get("ttft_ms"), peer.get("ttft_ms"),
                     ratio(ours.get("ttft_ms"), peer.get("ttft_ms")), "(info)", "info"])
        for spec in opts.variant:
            name = spec.partition("=")[0]
            b = s.get(name, {})
            rows.append([f"runtime / {name}, 1 client tok/s", ours.get("decode_tps"), b.get("decode_tps"),
                         ratio(ours.get("decode_tps"), b.get("decode_tps")), "(change)", "info"])
            rows.append([f"runtime / {name}, {opts.clients} clients tok/s", ours.get("aggregate_tps"),
                         b.get("aggregate_tps"), ratio(ours.get("aggregate_tps"), b.get("aggregate_tps")), "(change)", "info"])
        texts = {n: v.get("text0") for n, v in s.items() if v.get("text0")}
        ref = texts.get("in-process", "")
        differ = [n for n, t in texts.items() if t != ref]
        rows.append(["greedy 1-client text identical to in-process stream_generate", len(texts) - len(differ), len(texts),
                     None, "all", "met" if ref and not differ else "differ: " + ", ".join(differ)])
    else:
        one, many = s.get("1 rank", {}), s.get(f"{opts.ranks} ranks {opts.backend}", {})
        i1, iN = s.get("in-process 1 rank", {}), s.get(f"in-process {opts.ranks} ranks {opts.backend}", {})
        n, c = opts.ranks, opts.clients
        for label, x, y, key, note in (
                (f"{n} ranks / 1 rank, 1 client tok/s", many, one, "decode_tps", "(scaling)"),
                (f"{n} ranks / 1 rank, {c} clients aggregate tok/s", many, one, "aggregate_tps", "(scaling)"),
                (f"TTFT ms, 1 client: {n} ranks / 1 rank", many, one, "ttft_ms", "(info)"),
                (f"in-process {n} ranks / 1 rank, 1 client tok/s", iN, i1, "decode_tps", "(MLX's own scaling)"),
                (f"in-process {n} ranks / 1 rank, {c} seqs aggregate tok/s", iN, i1, "aggregate_tps", "(MLX's own scaling)"),
                (f"runtime / in-process, {n} ranks, 1 client tok/s", many, iN, "decode_tps", "(info)")):
            rows.append([label, x.get(key), y.get(key), ratio(x.get(key), y.get(key)), note, "info"])
        for label, x, y in (("runtime: greedy text, N ranks vs 1 rank", many, one),
                            ("runtime vs in-process, N ranks (same split)", many, iN),
                            ("runtime vs in-process, 1 rank", one, i1)):
            a, b = y.get("text0") or "", x.get("text0") or ""
            rows.append([label + " (chars in common / total)", common_prefix(a, b), len(a), None, "identical",
                         "-" if not a or not b else ("identical" if a == b else "differ")])
    for name, v in s.items():
        rows.append([f"  {name}: 1 client tok/s | {opts.clients} clients tok/s | TTFT ms | CPU ms/token",
                     v.get("decode_tps"), v.get("aggregate_tps"), v.get("ttft_ms"), v.get("cpu_ms_per_token"),
                     v.get("error") or ""])
    return rows


def print_table(res: dict) -> None:
    head = ["metric", "value", "reference", "ratio", "target", "verdict"]
    cells = [[r[0], fmt(r[1]), fmt(r[2]), fmt(r[3], 2), fmt(r[4], 2), str(r[5])[:120]] for r in res["summary"]]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"
    m = res["machine"]
    print()
    print(f"{res['mode']}: model {res['model']['name']} ({res['model']['parameters'] / 1e6:.0f}M params, "
          f"{res['model']['bytes'] / 2**30:.2f} GiB), {res['args']['tokens']} tokens, repeats {res['args']['repeats']}"
          f"/{res['args']['concurrent_repeats']}, {res['args']['clients']} clients; {m.get('gpu')}; mlx {m['mlx']} "
          f"({m.get('device')}), mlx-lm {m['mlx_lm']}; {res['date']}")
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    if res.get("crash"):
        print("CRASH: " + res["crash"][-1500:])


def machine_info() -> dict:
    import mlx.core as mx
    import mlx_lm

    info = {"python": platform.python_version(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "device": str(mx.default_device()), "cores": os.cpu_count(), "cpu": rb._lscpu_model()}
    try:
        info["gpu"] = "; ".join(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip().splitlines())
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["single", "tp"])
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
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="single: also measure the mlx_jaccl_cluster package in DIR under NAME (repeatable)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-inproc", action="store_true", help="tp: no in-process mlx-lm baselines")
    ap.add_argument("--peer-prompt-cache", type=int, default=0, help="mlx_lm.server --prompt-cache-size (default 0)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--concurrent-repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--profile", type=int, default=0, help="seconds of py-spy on the runtime (0: none)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mjc-gpu-bench"))
    ap.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    ap.add_argument("--io-timeout", type=float, default=120.0)
    ap.add_argument("--request-deadline", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    opts = ap.parse_args()
    opts.parallel = "tensor"
    if opts.mode == "single":
        opts.ranks = 1

    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    res: dict = {"mode": opts.mode, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "argv": sys.argv, "targets": TARGETS,
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}, "systems": {}}
    systems: list[System] = []
    try:
        res["machine"] = machine_info()
        if opts.mode == "tp" and opts.backend == "nccl":
            res["nccl_smoke"] = nccl_smoke(opts.ranks)
            for r in res["nccl_smoke"]["ranks"]:
                rb.log(f"nccl smoke, rank {r['rank']} rc={r['rc']}: {r['output'][-600:]}")
        model, origin = build_model(opts, workdir)
        res["model"] = {"name": model.name, "path": str(model), "bytes": rb.model_bytes(model), **origin}
        systems = (run_single if opts.mode == "single" else run_tp)(opts, model, workdir, res)
    except BaseException:
        res["crash"] = traceback.format_exc()
        rb.log(res["crash"])
    res["systems"] = {s.name: s.summary() | {"one_runs": s.one, "many_runs": s.many, "warmup": s.warmup}
                      for s in systems}
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
