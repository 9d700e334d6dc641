"""Real ranks on loopback: each rank is its own ``mjc-rank`` process, started directly with
the environment a service manager would give it (``MLX_RANK``, ``MLX_HOSTFILE``...), on
the MLX ``ring`` backend. No mocks of MLX."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from mlx_jaccl_cluster.models.tiny import build_tiny_model


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Cluster:
    """A group of rank processes and the URL of rank 0's API."""

    procs: list[subprocess.Popen]
    logs: list[Path]
    api: str
    model_id: str
    api_key: str | None = None
    env: dict = field(default_factory=dict)

    def rank_env(self, rank: int) -> dict:
        return self.env | {"MLX_RANK": str(rank)}

    def url(self, path: str) -> str:
        return self.api + path

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.log(r)[-4000:]}" for r in range(len(self.procs)))

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for rank, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    raise AssertionError(f"rank {rank} exited with {p.returncode} before the cluster was ready\n{self.all_logs()}")
            try:
                r = httpx.get(self.url("/health"), timeout=2)
                last = r.json()
                if r.status_code == 200:
                    return last
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise AssertionError(f"cluster not ready after {timeout} s (last /health: {last})\n{self.all_logs()}")

    def chat(self, content: str, **kw) -> dict:
        body = {"model": self.model_id, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
        r = httpx.post(self.url("/v1/chat/completions"), json=body, headers=self.headers(), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        procs = [p for p in self.procs if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_cluster(
    model: Path,
    world: int,
    workdir: Path,
    *,
    parallel: str = "tensor",
    args: tuple[str, ...] = (),
    env: dict | None = None,
    order: list[int] | None = None,
    delay: float = 0.0,
    api_key: str | None = None,
) -> Cluster:
    """Start ``world`` ranks of ``mjc-rank`` (those in ``order``, in that order, ``delay`` s apart)."""
    workdir.mkdir(parents=True, exist_ok=True)
    api_port, control_port, *ring_ports = free_ports(2 + world)
    hostfile = workdir / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ring_ports]))
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MJC_"))
    } | {
        "MLX_HOSTFILE": str(hostfile),
        "MJC_BACKEND": "ring",
        "MJC_PARALLEL": parallel,
        "MJC_MODEL": str(model),
        "MJC_CONTROL": f"127.0.0.1:{control_port}",
        "MJC_API_PORT": str(api_port),
        "HF_HUB_OFFLINE": "1",
    }
    if api_key:
        base["MJC_API_KEY"] = api_key
    base |= env or {}
    procs: list[subprocess.Popen | None] = [None] * world
    logs = [workdir / f"rank{r}.log" for r in range(world)]
    for i, rank in enumerate(order or range(world)):
        if i and delay:
            time.sleep(delay)
        procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "mlx_jaccl_cluster.main", *args],
            env=base | {"MLX_RANK": str(rank)},
            stdout=logs[rank].open("w"),
            stderr=subprocess.STDOUT,
        )
    return Cluster(procs=procs, logs=logs, api=f"http://127.0.0.1:{api_port}", model_id=model.name, api_key=api_key,
                   env=base)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir) -> Path:
    return build_tiny_model(models_dir / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(models_dir) -> Path:
    return build_tiny_model(models_dir / "tiny-qwen2", arch="qwen2")


@pytest.fixture
def cluster_factory(tmp_path):
    """Start clusters inside a test; every one is stopped afterwards, logs shown on failure."""
    started: list[Cluster] = []

    def make(model: Path, world: int, **kw) -> Cluster:
        c = start_cluster(model, world, tmp_path / f"c{len(started)}", **kw)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def reference_text(model: Path, messages: list[dict] | None = None, prompt: str | None = None, max_tokens: int = 32,
                   sampler=None) -> str:
    """Output of in-process mlx-lm on the same model and prompt (greedy unless ``sampler``)."""
    from mlx_lm import stream_generate

    model_obj, tokenizer = _load_cached(str(model))
    if messages is not None:
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        tokens = tokenizer.encode(prompt)
    return "".join(r.text for r in stream_generate(model_obj, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler))


_LOADED: dict[str, tuple] = {}


def _load_cached(path: str):
    from mlx_lm import load

    if path not in _LOADED:
        _LOADED[path] = load(path)
    return _LOADED[path]
