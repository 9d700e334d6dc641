"""The whole OpenAPI schema, fuzzed (schemathesis, valid and invalid data) against a real
1-rank tiny-model server with an API key; and the schema itself says what the server does."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import running_cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuzz_api  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "fuzz-test-key-0123456789"


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    with running_cluster(
        tiny_llama,
        1,
        tmp_path_factory.mktemp("fuzz"),
        api_key=KEY,
        # max_context bounds the surfaces that generate to the end of the context
        # when no limit is given (Responses without max_output_tokens, Ollama's -1/-2)
        args=("--default-max-tokens", "8", "--max-context", "256", "--request-timeout", "60"),
    ) as c:
        yield c


def _post(cluster, path: str, body: dict) -> httpx.Response:
    return httpx.post(cluster.url(path), json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_openapi_documents_what_the_server_answers(cluster):
    schema = httpx.get(cluster.url("/openapi.json")).json()
    assert '"422"' not in str(schema).replace("'", '"')
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(responses), sorted(responses)
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
        assert "$ref" in responses["200"]["content"]["application/json"]["schema"]
        assert "text/event-stream" in responses["200"]["content"]
    assert schema["paths"]["/v1/models"]["get"]["security"] == [{"apiKey": []}]
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["echo"]["enum"] == [False]
    assert completion["prompt"]["anyOf"][0]["minLength"] == 1
    assert completion["model"]["enum"] == [cluster.model_id]
    # what the schema accepts is accepted, what it refuses is refused, with 400 in the error shape
    base = {"model": cluster.model_id, "prompt": "hello", "max_tokens": 2}
    assert _post(cluster, "/v1/completions", base | {"n": 1.0, "max_tokens": 2.0}).status_code == 200
    for bad in ({"prompt": ""}, {"echo": True}, {"n": "1"}, {"max_tokens": 2.5}, {"temperature": "1"}):
        r = _post(cluster, "/v1/completions", base | bad)
        assert r.status_code == 400, (bad, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_schemathesis_finds_nothing_and_the_server_stays_healthy(cluster, tmp_path):
    started = time.monotonic()
    code, output = fuzz_api.run(cluster.api, key=KEY, examples=20, seed=7, report=tmp_path)
    assert code == 0, output[-6000:]
    assert "No issues found" in output
    generated = int(output.split(" generated")[0].rsplit(None, 1)[-1])
    assert generated >= 200, output[-2000:]  # a few hundred cases, the negative phase included
    assert time.monotonic() - started < 240
    health = httpx.get(cluster.url("/health")).json()
    assert health["status"] == "ok" and health["active"] == 0
