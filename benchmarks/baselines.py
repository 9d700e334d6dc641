#!/usr/bin/env python3
"""What our API is measured against, kept loaded beside it so that their runs alternate (on
a shared 2-core machine, speed drifts by 20-30 % within a minute):

- :class:`Baseline`: in-process mlx-lm. Every rank runs this file (``MLX_RANK`` +
  ``MLX_HOSTFILE``, ``mx.distributed.init(backend="ring", strict=True)`` or nccl with
  ``MJC_BENCH_BACKEND``, ``sharded_load``, ``stream_generate`` / ``BatchGenerator``) and
  waits on stdin for each run;
- :class:`Peer`: ``python -m mlx_lm.server`` on every rank, SIGSTOPped between its own runs.

Used by ``runtime_bench.py`` (CPU) and ``gpu_bench.py`` (GPUs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import (
    PROMPT,
    Prompts,
    counted,
    kill_procs,
    median,
    messages,
    pick,
    proc_status,
    prompt_counter,
    ring_env,
    tail,
)

# --------------------------------------------------------------------------------------
# the in-process baseline (this file, run by every rank)
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
# the peer: mlx_lm.server
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


def main() -> int:
    """One rank of the in-process baseline, as :class:`Baseline` starts it."""
    ap = argparse.ArgumentParser(description="One rank of the in-process baseline (commands on stdin).")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--parallel", choices=["tensor", "pipeline"], default="tensor")
    ap.add_argument("--tokens", type=int, required=True, help="max_tokens of every run")
    ap.add_argument("--result-dir", type=Path, required=True, help="where each rank writes its VmHWM")
    baseline_worker(ap.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
