"""Real ranks on loopback: each rank is its own ``mjc-rank`` process, started directly with
the environment a service manager would give it (``MLX_RANK``, ``MLX_HOSTFILE``...), on
the MLX ``ring`` backend. No mocks of MLX."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from mlx_jaccl_cluster.launch import LocalGroup
from mlx_jaccl_cluster.launch import start_group as _start_group
from mlx_jaccl_cluster.models.tiny import build_tiny_model


class Cluster(LocalGroup):
    """A LocalGroup with the assertions the tests share."""

    def wait_ready(self, timeout: float = 120.0) -> dict:
        try:
            return super().wait_ready(timeout)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None

    def chat(self, content: str, **kw) -> dict:
        body = {"model": self.model_id, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
        r = httpx.post(self.url("/v1/chat/completions"), json=body, headers=self.headers(), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()


def start_cluster(model: Path, world: int, workdir: Path, **kw) -> Cluster:
    return _start_group(model, world, workdir, group_class=Cluster, **kw)


@contextmanager
def running_cluster(model: Path, world: int, workdir: Path, **kw) -> Iterator[Cluster]:
    """A started, ready cluster, stopped on leaving the block (for module fixtures)."""
    c = start_cluster(model, world, workdir, **kw)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


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
    """Start clusters inside a test; every one is stopped afterwards."""
    started: list[Cluster] = []

    def make(model: Path, world: int, **kw) -> Cluster:
        c = start_cluster(model, world, tmp_path / f"c{len(started)}", **kw)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


_LOADED: dict[str, tuple] = {}


def reference_text(
    model: Path, messages: list[dict] | None = None, prompt: str | None = None, max_tokens: int = 32, sampler=None
) -> str:
    """Output of in-process mlx-lm on the same model and prompt (greedy unless ``sampler``)."""
    from mlx_lm import load, stream_generate

    if str(model) not in _LOADED:
        _LOADED[str(model)] = load(str(model))
    model_obj, tokenizer = _LOADED[str(model)]
    if messages is not None:
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        tokens = tokenizer.encode(prompt)
    return "".join(
        r.text for r in stream_generate(model_obj, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler)
    )


@pytest.fixture(scope="session")
def scripted_qwen2(models_dir) -> Path:
    """Answers every chat with reasoning, a sentence and one get_weather tool call."""
    from mlx_jaccl_cluster.models.scripted import build_scripted_model

    return build_scripted_model(models_dir / "scripted-qwen2", arch="qwen2")
