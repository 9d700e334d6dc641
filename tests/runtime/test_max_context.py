"""The maximum context setting (``max_context``, the inventory's ``cluster_runtime_settings``
-> ``MJC_MAX_CONTEXT``) on a 2-rank pipeline: below the model's own context it is the limit
every request is held to (a longer prompt, or a max_tokens that does not fit after the
prompt, is a 400 naming it), a request without max_tokens stops at it, and what fits is
answered like in-process mlx-lm. The fit check sizes each rank's KV cache for it
(ops/placement.py); this is the runtime half."""

from __future__ import annotations

import httpx
import pytest
from conftest import reference_text

pytestmark = pytest.mark.slow

MAX_CONTEXT = 64


def _post(cluster, content: str, **kw) -> httpx.Response:
    body = {"model": cluster.model_id, "messages": [{"role": "user", "content": content}], "temperature": 0} | kw
    return httpx.post(cluster.url("/v1/chat/completions"), json=body, headers=cluster.headers(), timeout=120)


def test_max_context_bounds_every_request(tiny_llama, cluster_factory):
    cluster = cluster_factory(tiny_llama, 2, parallel="pipeline", args=("--max-context", str(MAX_CONTEXT)))
    health = cluster.wait_ready()
    assert health["ranks_up"] == 2 and health["parallel"] == "pipeline"

    long = _post(cluster, "the quick brown fox jumps over the lazy dog " * 12, max_tokens=4)
    assert long.status_code == 400, long.text
    error = long.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"context is {MAX_CONTEXT} tokens" in error["message"]

    too_many = _post(cluster, "What is the capital of France?", max_tokens=MAX_CONTEXT)
    assert too_many.status_code == 400, too_many.text
    assert too_many.json()["error"]["param"] == "max_tokens"
    assert f"in the {MAX_CONTEXT}-token context" in too_many.json()["error"]["message"]

    fits = _post(cluster, "What is the capital of France?", max_tokens=8)
    assert fits.status_code == 200, fits.text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert fits.json()["choices"][0]["message"]["content"] == reference_text(tiny_llama, messages, max_tokens=8)

    unbounded = _post(cluster, "Tell me about the quick brown fox.")  # default_max_tokens, capped by the rest
    assert unbounded.status_code == 200, unbounded.text
    usage = unbounded.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= MAX_CONTEXT, usage
