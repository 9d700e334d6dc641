"""Helpers the benchmark drivers share (``runtime_bench.py``, ``gpu_bench.py``, and the
baselines in ``baselines.py``): CPU time of process trees, picking the rounds that count,
the loopback environment of directly started ranks, the chat request bodies and the prompts
(over ``mlx_jaccl_cluster.ops.apibench``, whose client they re-export), report formatting.
Measures nothing itself.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
# re-exported: the drivers' one HTTP client
from mlx_jaccl_cluster.ops.apibench import (  # noqa: E402, F401
    PROMPT,
    Prompts,
    concurrent,
    median,
    sequential,
    stream_chat,
)


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


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


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
