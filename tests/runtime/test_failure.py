"""Start-up in any order, clear start-up errors, and crash-only behaviour when a rank dies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_ranks_started_out_of_order_and_apart_form_the_group(tiny_llama, cluster_factory):
    cluster = cluster_factory(tiny_llama, 3, order=[2, 1, 0], delay=4.0)
    started = time.monotonic()
    health = cluster.wait_ready(timeout=60)
    assert health["ranks_up"] == 3
    # rank 0 came last; the group formed promptly after it (no MLX connect back-off)
    assert time.monotonic() - started < 30
    assert "waiting for rank 0" in cluster.log(2) or "joined the group" in cluster.log(2)


def test_sigkill_of_a_rank_mid_stream(tiny_llama, cluster_factory):
    cluster = cluster_factory(tiny_llama, 3)
    cluster.wait_ready()
    body = {
        "model": cluster.model_id,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    lines: list[str] = []
    got_some = threading.Event()

    def read():
        with httpx.stream("POST", cluster.url("/v1/chat/completions"), json=body, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) > 6:
                    got_some.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert got_some.wait(30), cluster.all_logs()
    killed_at = time.monotonic()
    cluster.procs[1].send_signal(signal.SIGKILL)

    saw_503 = False
    while time.monotonic() - killed_at < 5:
        try:
            r = httpx.get(cluster.url("/health"), timeout=1)
            if r.status_code == 503:
                saw_503 = True
                assert r.json()["status"] == "lost"
                new = httpx.post(cluster.url("/v1/chat/completions"), json=body | {"stream": False}, timeout=2)
                assert new.status_code == 503
                break
        except httpx.TransportError:
            break  # rank 0 already exited: connections refused is the accepted gap
        time.sleep(0.05)
    reader.join(10)
    assert not reader.is_alive(), "the stream hung after a rank died"
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    error = json.loads(data[-2][6:])["error"]
    assert "rank 1" in error["message"]
    for rank in (0, 2):
        code = cluster.procs[rank].wait(timeout=10)
        assert code != 0, f"rank {rank} exited 0"
    assert time.monotonic() - killed_at < 10
    assert saw_503 or cluster.procs[0].returncode is not None


def test_missing_model_folder_is_one_clear_error(tmp_path, cluster_factory):
    cluster = cluster_factory(tmp_path / "no-such-model", 1)
    assert cluster.procs[0].wait(timeout=60) == 2
    log = cluster.log(0)
    assert "no-such-model does not exist" in log
    assert "Traceback" not in log


def test_a_pipeline_split_the_model_cannot_take_stops_every_rank_by_name(tiny_llama, cluster_factory):
    """Every rank exits with the split and the model's layer count named (llama has no pipeline
    split of its own in mlx-lm: this is the generic split's check)."""
    cluster = cluster_factory(tiny_llama, 2, parallel="pipeline", split=[1, 1])
    codes = [p.wait(timeout=60) for p in cluster.procs]
    assert codes[0] != 0 and codes[1] != 0
    logs = cluster.log(0) + cluster.log(1)
    assert "pipeline split [1, 1] must give every rank at least one layer and sum to the model's" in logs, logs[-2000:]


def test_rank_with_a_different_config_is_rejected_by_name(tiny_llama, cluster_factory):
    cluster = cluster_factory(tiny_llama, 2, order=[0])
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_jaccl_cluster.main", "--max-batch", "3"],
        env=cluster.rank_env(1),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "max_batch is 3 on this rank but 8 on rank 0" in proc.stderr
    assert "rejected rank 1" in cluster.log(0)
