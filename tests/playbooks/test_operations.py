"""Day-2 playbooks on a private copy of inventory/local-tensor (3 tensor-parallel ring ranks
under supervisord, so tensor parallel also runs through the playbooks):
status, bench (link and api), stop, restart and uninstall each leave the state they promise."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from ansible_run import ROOT, changed, playbook_argv
from local_cluster import converge, playbook

pytestmark = pytest.mark.slow

INVENTORY = "local-tensor"  # read by the local_inventory fixture

LINK_ARGS = json.dumps(
    {
        "bench_sizes": ["4K", "64K", "1M"],
        "bench_rounds": 2,
        "bench_budget": "4M",
        "bench_latency_iters": 50,
        "bench_gather_sizes": ["64K"],
    }
)


@pytest.fixture(scope="module")
def cluster(local_inventory):
    inv, prefix, api = local_inventory
    assert "A: The capital of France is Paris." in converge(inv)
    return inv, prefix, api


def supervisorctl(prefix, *args: str) -> str:
    ctl = [str(prefix / "venv" / "bin" / "supervisorctl"), "-c", str(prefix / "etc" / "supervisord.conf")]
    return subprocess.run(ctl + list(args), capture_output=True, text=True, timeout=60).stdout


def rank_pids(prefix) -> dict[str, int]:
    """Unit -> PID of every running rank."""
    pids = {}
    for line in supervisorctl(prefix, "status").splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] == "RUNNING":
            pids[parts[0]] = int(parts[3].rstrip(","))
    return pids


def health(api) -> dict:
    return httpx.get(f"http://127.0.0.1:{api}/health", timeout=5).json()


def table(output: str) -> list[str]:
    """The status table's node rows."""
    return [line.strip() for line in output.splitlines() if line.strip()[:1].isdigit() and "rank" in line]


def test_status_is_healthy_and_changes_nothing(cluster):
    inv, _, _ = cluster
    out = playbook(inv, "playbooks/status.yml").stdout
    rows = table(out)
    assert [r.split()[:2] for r in rows] == [["0", "rank0"], ["1", "rank1"], ["2", "rank2"]]
    assert all("supervisord:RUNNING" in r and "verified" in r and "0.32.4" in r for r in rows)
    assert "ranks up 3/3" in out and "healthy" in out
    check = playbook(inv, "playbooks/status.yml", "--check").stdout
    assert changed(check) == [0, 0, 0] and "ranks up 3/3" in check


def test_link_bench_writes_four_files_and_restores_the_service(cluster, tmp_path):
    inv, prefix, api = cluster
    before = rank_pids(prefix)
    out = playbook(inv, "playbooks/bench.yml", "-e", LINK_ARGS, "-e", f"bench_results_dir={tmp_path}").stdout
    (run,) = tmp_path.iterdir()
    assert run.name.endswith(f"-{INVENTORY}")  # results/<date>-<inventory name>
    assert {p.name for p in run.iterdir()} == {"link-raw.json", "link.json", "link.csv", "link.md", "link.png"}
    result = json.loads((run / "link.json").read_text())
    assert result["world_size"] == 3 and result["backend"] == "ring" and result["link_gbps"] is None
    assert 0 < result["latency"]["median_s"] < 1
    assert [r["bytes"] for r in result["all_sum"]] == [4096, 65536, 1 << 20]
    for row in result["all_sum"]:
        assert row["iters"] >= 6 and row["peak_gbps"] >= row["avg_gbps"] > 0 and row["bare"]["median_s"] > 0
    assert len(result["pairs"]) == 6 and all(p["median_gbps"] > 0 for p in result["pairs"])
    rows = list(csv.reader((run / "link.csv").open()))
    assert len(rows) == 1 + 1 + 3 + 1 + 6
    assert "| all_sum | 64 KB |" in (run / "link.md").read_text()
    assert (run / "link.png").read_bytes()[:4] == b"\x89PNG"
    assert "latency (1 elem)" in out and "vs bare %" in out
    # the group was stopped for the sweep and is serving again, with new processes
    after = rank_pids(prefix)
    assert len(after) == 3 and not set(after.values()) & set(before.values())
    assert health(api)["ranks_up"] == 3


def bench_pids(prefix) -> dict[int, int]:
    """MLX rank -> PID of every mjc-bench process of this cluster."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(arg.decode(errors="replace").endswith(f"{prefix}/venv/bin/mjc-bench") for arg in argv[:2]):
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
            found[int(env[b"MLX_RANK"])] = int(proc.name)
        except (OSError, ValueError, KeyError):
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "silent"])
def test_link_bench_with_a_lost_rank_ends_fast_names_it_and_restores_the_service(cluster, tmp_path, signum):
    """Rank 1's mjc-bench dies (SIGKILL) or goes silent with its sockets open (SIGSTOP, as a
    host that drops off the network): ranks 0 and 2 give up within a minute naming rank 1
    (without the watchdog a silent rank keeps them in a collective until the 30-minute task
    timeout), the playbook fails, the group serves again."""
    inv, prefix, api = cluster
    long_sweep = {
        "bench_sizes": ["16M"],
        "bench_rounds": 1000,
        "bench_budget": "1G",
        "bench_latency_iters": 50,
        "bench_gather_sizes": [],
        "bench_pairs_enabled": False,
        "bench_results_dir": str(tmp_path),
    }
    run = subprocess.Popen(
        playbook_argv("playbooks/bench.yml", inventory=inv, extra=long_sweep),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    victim = None
    try:
        deadline = time.monotonic() + 300
        while len(bench_pids(prefix)) < 3:
            assert run.poll() is None and time.monotonic() < deadline, "mjc-bench did not start on every rank"
            time.sleep(0.5)
        time.sleep(8)  # into the sweep: the MLX group has formed
        assert len(bench_pids(prefix)) == 3, "the sweep ended before the loss: make it longer"
        victim = bench_pids(prefix)[1]
        os.kill(victim, signum)
        lost = time.monotonic()
        while {0, 2} & set(bench_pids(prefix)):
            assert time.monotonic() - lost < 60, (
                f"ranks still sweeping a minute after rank 1 was lost: {bench_pids(prefix)}"
            )
            time.sleep(0.5)
        gone_after = time.monotonic() - lost
        if signum == signal.SIGSTOP:
            os.kill(victim, signal.SIGKILL)  # its host never comes back; its own task may end now
        out, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        if victim and os.path.exists(f"/proc/{victim}"):
            os.kill(victim, signal.SIGKILL)
    assert run.returncode == 2, out[-5000:]
    assert "lost rank 1" in out or "rank 1 (" in out and "no heartbeat" in out, out[-5000:]
    print(f"\nranks 0 and 2 gone {gone_after:.1f} s after rank 1 was lost ({signal.Signals(signum).name})")
    assert health(api)["ranks_up"] == 3
    assert len(rank_pids(prefix)) == 3


def test_api_bench(cluster, tmp_path):
    inv, _, _ = cluster
    args = json.dumps(
        {
            "bench_mode": "api",
            "bench_api_clients": [1, 2],
            "bench_api_tokens": 16,
            "bench_api_rounds": 1,
            "bench_results_dir": str(tmp_path),
        }
    )
    out = playbook(inv, "playbooks/bench.yml", "-e", args).stdout
    (run,) = tmp_path.iterdir()
    assert {p.name for p in run.iterdir()} == {"api-raw.json", "api.json", "api.csv", "api.md", "api.png"}
    runs = json.loads((run / "api.json").read_text())["runs"]
    assert [r["clients"] for r in runs] == [1, 2] and [r["requests"] for r in runs] == [1, 2]
    for r in runs:
        assert r["errors"] == [] and r["aggregate_tps"] > 0 and r["ttft_ms_median"] > 0
    assert "aggregate tok/s" in out


def test_status_fails_when_a_rank_is_stopped(cluster):
    inv, prefix, _ = cluster
    supervisorctl(prefix, "stop", "mjc-test-rank1")
    out = playbook(inv, "playbooks/status.yml", rcs=(2,)).stdout
    assert "rank1: rank 1 is not running (supervisord says STOPPED)" in out
    assert "The cluster is unhealthy" in out


def test_restart_stops_every_old_rank_then_serves(cluster):
    inv, prefix, api = cluster
    before = rank_pids(prefix)
    out = playbook(inv, "playbooks/restart.yml").stdout
    after = rank_pids(prefix)
    assert len(after) == 3 and not set(after.values()) & set(before.values())
    assert health(api)["ranks_up"] == 3
    assert "A: The capital of France is Paris." in out
    playbook(inv, "playbooks/status.yml")


def test_stop_leaves_no_rank_and_is_idempotent(cluster):
    inv, prefix, _ = cluster
    pids = rank_pids(prefix)
    playbook(inv, "playbooks/stop.yml")
    assert rank_pids(prefix) == {}
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}")
    assert changed(playbook(inv, "playbooks/stop.yml").stdout) == [0, 0, 0]
    playbook(inv, "playbooks/status.yml", rcs=(2,))


def test_uninstall_keeps_models_unless_asked_and_leaves_nothing(cluster):
    inv, prefix, _ = cluster
    playbook(inv, "playbooks/restart.yml")
    pids = rank_pids(prefix)
    playbook(inv, "playbooks/uninstall.yml")
    assert [p.name for p in prefix.iterdir()] == ["models"]
    assert (prefix / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file()
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}")
    assert changed(playbook(inv, "playbooks/uninstall.yml").stdout) == [0, 0, 0]
    out = playbook(inv, "playbooks/status.yml", rcs=(2,)).stdout
    assert "not installed" in out
    playbook(inv, "playbooks/uninstall.yml", "-e", "cluster_uninstall_models=true")
    assert not prefix.exists()
    assert changed(playbook(inv, "playbooks/uninstall.yml", "-e", "cluster_uninstall_models=true").stdout) == [0, 0, 0]
