"""Day-2 playbooks over SSH on the lab (systemd user units): status, the link bench,
stop, restart and uninstall, then site.yml again so that test_recovery finds a cluster.

Module-level tests run in order; each leaves the state the next one starts from.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import UNIT, http

RANK_LOGS_ON_FAILURE = True
STOPPED = 2  # the rank stopped by hand for the unhealthy status


def run(lab, playbook: str, *args: str, rc: int = 0, timeout: int = 600) -> str:
    proc = lab.ansible_playbook(*args, playbook=playbook, timeout=timeout)
    assert proc.returncode == rc, f"{playbook}: rc={proc.returncode}\n{proc.stdout[-5000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def unchanged(out: str) -> bool:
    return all(n == "0" for n in re.findall(r"changed=(\d+)", out.split("PLAY RECAP")[-1]))


def active(lab) -> dict[str, str]:
    return {r.name: lab.host(r.name).run(f"systemctl --user is-active {UNIT}").stdout.strip() for r in lab.ranks}


def pids(lab) -> dict[str, str]:
    return {
        r.name: lab.host(r.name).check_output(f"systemctl --user show -p MainPID --value {UNIT}") for r in lab.ranks
    }


def test_status_healthy(lab):
    out = run(lab, "playbooks/status.yml")
    for r in lab.ranks:
        assert f"{r.rank}  {r.name}" in out
    assert out.count("systemd:active/running") == len(lab.ranks) and out.count("verified") >= len(lab.ranks)
    assert f"ranks up {len(lab.ranks)}/{len(lab.ranks)}" in out and "healthy" in out
    assert unchanged(run(lab, "playbooks/status.yml", "--check"))


def test_link_bench_over_ssh_restores_the_group(lab, tmp_path):
    before = pids(lab)
    args = json.dumps(
        {
            "bench_sizes": ["4K", "1M"],
            "bench_rounds": 2,
            "bench_budget": "4M",
            "bench_latency_iters": 50,
            "bench_gather_sizes": [],
            "bench_results_dir": str(tmp_path),
        }
    )
    out = run(lab, "playbooks/bench.yml", "-e", args)
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith("-lab")
    assert {p.name for p in folder.iterdir()} >= {"link.json", "link.csv", "link.md", "link.png"}
    result = json.loads((folder / "link.json").read_text())
    assert result["world_size"] == len(lab.ranks) and len(result["pairs"]) == len(lab.ranks) * (len(lab.ranks) - 1)
    assert all(r["avg_gbps"] > 0 for r in result["all_sum"]) and "latency (1 elem)" in out
    after = pids(lab)
    assert set(active(lab).values()) == {"active"} and all(after[h] != before[h] for h in after)
    assert http(f"{lab.api}/health")[1]["ranks_up"] == len(lab.ranks)


def test_status_fails_with_a_rank_stopped(lab):
    name = lab.ranks[STOPPED].name
    lab.host(name).check_output(f"systemctl --user stop {UNIT}")
    out = run(lab, "playbooks/status.yml", rc=2)
    assert f"{name}: rank {STOPPED} is not running (systemd says inactive/dead)" in out


def test_restart_brings_the_whole_group_back(lab):
    run(lab, "playbooks/restart.yml")
    assert set(active(lab).values()) == {"active"}
    run(lab, "playbooks/status.yml")


def test_stop_stops_every_rank_idempotently(lab):
    run(lab, "playbooks/stop.yml")
    assert set(active(lab).values()) == {"inactive"}
    assert unchanged(run(lab, "playbooks/stop.yml"))


@pytest.mark.parametrize("models", ["false", "true"])
def test_uninstall(lab, models):
    run(lab, "playbooks/uninstall.yml", "-e", f"cluster_uninstall_models={models}")
    for r in lab.ranks:
        host = lab.host(r.name)
        assert host.run(f"test -e ~/.config/systemd/user/{UNIT}.service").rc == 1
        assert host.run(f"systemctl --user cat {UNIT}").rc != 0  # the manager forgot it too
        assert host.run(f"pgrep -f {lab.prefix}/venv/bin/mjc-rank").rc == 1
        left = host.run(f"ls -A {lab.prefix}").stdout.split() if host.file(lab.prefix).exists else []
        assert left == ([] if models == "true" else ["models"])
    assert unchanged(run(lab, "playbooks/uninstall.yml", "-e", f"cluster_uninstall_models={models}"))


def test_site_converges_again_after_uninstall(lab):
    run(lab, "site.yml", timeout=900)
    assert http(f"{lab.api}/health")[1]["ranks_up"] == len(lab.ranks)
