"""engine.collectives and mjc-bench on real ranks: ring over loopback, one process per rank,
started with the environment a service manager gives a rank (MLX_RANK + MLX_HOSTFILE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_jaccl_cluster.launch import free_ports

pytestmark = pytest.mark.slow

WORKER = r"""
import json, sys
import mlx.core as mx
from mlx_jaccl_cluster.engine import collectives as c
g = mx.distributed.init(backend="ring", strict=True)
r = g.rank()
out = {
    "latency": len(c.all_sum_latency(g, 20)),
    "all_sum": c.all_sum_times(g, 64 * 1024, 5),
    "all_gather": len(c.all_gather_times(g, 4096, 3)),
    "send_0_1": len(c.send_recv_times(g, 0, 1, 4096, 4)),
    "send_1_0": len(c.send_recv_times(g, 1, 0, 4096, 4)),
}
try:
    c.all_sum_times(g, 3, 1)
except ValueError as exc:
    out["too_small"] = str(exc)
# A rank whose all_sum comes back wrong must say so (rank 1 corrupts its own result).
if r == 1:
    real = mx.distributed.all_sum
    mx.distributed.all_sum = lambda x, group=None: real(x, group=group) + 1
try:
    c.all_sum_times(g, 4096, 1, warmup=0)
    out["corrupt"] = "no error"
except c.CollectiveError as exc:
    out["corrupt"] = str(exc)
print(json.dumps(out), flush=True)
"""


def run_ranks(tmp_path: Path, world: int, argv_of, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    hostfile = tmp_path / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(world)]))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "MJC_"))}
    procs = [
        subprocess.Popen(
            argv_of(rank),
            env=base | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "MJC_BACKEND": "ring"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for rank in range(world)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_collectives_time_and_check_every_result(tmp_path):
    results = run_ranks(tmp_path, 2, lambda rank: [sys.executable, "-c", WORKER])
    for p in results:
        assert p.returncode == 0, p.stderr[-3000:]
    rank0, rank1 = (json.loads(p.stdout.strip().splitlines()[-1]) for p in results)
    assert rank0["latency"] == rank1["latency"] == 20
    assert len(rank0["all_sum"]) == 5 and all(0 < t < 10 for t in rank0["all_sum"])
    assert rank0["all_gather"] == 3
    assert rank0["send_0_1"] == rank1["send_0_1"] == 4 and rank1["send_1_0"] == 4
    assert "smaller than one float32" in rank0["too_small"]
    assert rank0["corrupt"] == "no error"
    assert rank1["corrupt"] == "all_sum of 4096 B returned a wrong result"


def test_mjc_bench_sweep_and_bare_loop(tmp_path):
    out = tmp_path / "link.json"
    argv = [
        sys.executable,
        "-m",
        "mlx_jaccl_cluster.bench",
        "--sizes",
        "4K",
        "256K",
        "--rounds",
        "2",
        "--budget",
        "1M",
        "--max-iters",
        "20",
        "--latency-iters",
        "30",
        "--gather-sizes",
        "64K",
        "--pairs",
        "--pair-size",
        "64K",
        "--out",
        str(out),
    ]
    for p in run_ranks(tmp_path, 2, lambda rank: argv):
        assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kind"] == "link" and result["world_size"] == 2 and result["backend"] == "ring"
    assert result["latency"]["iters"] == 30 and 0 < result["latency"]["median_s"] <= result["latency"]["p99_s"]
    assert [r["bytes"] for r in result["all_sum"]] == [4096, 256 * 1024]
    for row in result["all_sum"]:
        assert row["iters"] == row["bare"]["iters"] == 2 * min(20, max(3, (1 << 20) // row["bytes"]))
        assert 0 < row["min_s"] <= row["median_s"] and row["peak_gbps"] >= row["avg_gbps"] > 0
        assert row["overhead_pct"] == pytest.approx((row["median_s"] / row["bare"]["median_s"] - 1) * 100)
    assert [(p["src"], p["dst"]) for p in result["pairs"]] == [(0, 1), (1, 0)]
    assert all(p["median_s"] > 0 and p["median_gbps"] > 0 for p in result["pairs"])
    assert result["all_gather"][0]["bytes"] == 64 * 1024
