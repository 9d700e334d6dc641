"""`make up`'s path on a private copy of inventory/local: site.yml converges two local ranks
under supervisord serving SmolLM2 as a pipeline (auto: its heads do not divide by 2), answers
Paris, and a second run changes nothing."""

from __future__ import annotations

import httpx
import pytest
from ansible_run import changed
from local_cluster import converge

pytestmark = pytest.mark.slow


def test_converges_serves_and_is_idempotent(local_inventory):
    inv, prefix, api = local_inventory
    first = converge(inv)
    assert "A: The capital of France is Paris." in first
    health = httpx.get(f"http://127.0.0.1:{api}/health").json()
    assert health["status"] == "ok" and health["ranks_up"] == 2 and health["world_size"] == 2
    assert (
        health["parallel"] == "pipeline"
        and "num_attention_heads (9) is not divisible by 2" in health["parallel_reason"]
    )
    assert "2 ranks, ring, pipeline" in first  # the plan, resolved by placement, says so too
    assert "rank 0 rank0: layers 0..14" in first and "rank 1 rank1: layers 15..29" in first
    assert (prefix / "etc" / "hostfile.json").is_file()
    assert sorted(p.name for p in (prefix / "etc" / "supervisor").iterdir()) == [
        f"mjc-test-rank{i}.conf" for i in range(2)
    ]

    second = converge(inv)
    assert changed(second) == [0, 0], second.split("PLAY RECAP")[-1]
