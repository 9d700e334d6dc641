"""No play changes a node before every node passed the read-only Readiness gate, and a host
that drops out at any point stops the whole run, named, before the next change.

Fast checks with the local connection (the lab's molecule/default/tests/test_guards.py stops a
real host's sshd before each node-changing play)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from ansible_run import ROOT, ansible_playbook

# Roles that change nodes (model: its main entry; its controller side touches no node).
CHANGING = {"python_env", "backend_config", "model", "service", "mac_hygiene", "uninstall", "bench"}
# The measuring play of bench.yml leaves any_errors_fatal off so that a failed sweep still
# reaches the block's `always` (the service is started again); its previous play is the gate.
UNGATED_ON_PURPOSE = {("bench.yml", "Bench | measure the cluster")}


def plays(path: Path) -> list[dict]:
    out = []
    for play in yaml.safe_load(path.read_text()):
        if "ansible.builtin.import_playbook" in play:
            out += plays(path.parent / play["ansible.builtin.import_playbook"])
        else:
            out.append(play)
    return out


def role_names(play: dict) -> list[str]:
    names = [r if isinstance(r, str) else r["role"] for r in play.get("roles", [])]
    for task in play.get("tasks", []) + play.get("pre_tasks", []) + play.get("post_tasks", []):
        include = task.get("ansible.builtin.include_role") or {}
        if include and include.get("tasks_from") not in ("controller", "validate", "darwin"):
            names.append(include["name"])
    return names


PLAYBOOKS = sorted([ROOT / "site.yml", *(ROOT / "playbooks").glob("*.yml")])


@pytest.mark.parametrize("path", PLAYBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_node_changing_play_is_gated(path):
    for play in plays(path):
        roles = role_names(play)
        if not CHANGING & set(roles) or (path.name, play["name"]) in UNGATED_ON_PURPOSE:
            continue
        where = f"{path.name}: play {play['name']!r}"
        assert play.get("any_errors_fatal") is True, f"{where} changes nodes without any_errors_fatal"
        assert play.get("max_fail_percentage") == 0, f"{where} changes nodes without max_fail_percentage: 0"
        first_change = next(i for i, r in enumerate(roles) if r in CHANGING)
        assert "cluster_gate" in roles[:first_change], f"{where} changes nodes before cluster_gate"


def test_site_runs_the_read_only_readiness_before_any_node_changes():
    names = [play["name"].split(" |")[0] for play in plays(ROOT / "site.yml")]
    first_change = next(i for i, play in enumerate(plays(ROOT / "site.yml")) if CHANGING & set(role_names(play)))
    assert "Readiness" in names[:first_change], names


def inventory(tmp_path: Path, **rank2: object) -> Path:
    path = tmp_path / "hosts.yml"
    path.write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        "mlx_cluster": {
                            "hosts": {
                                f"rank{i}": {
                                    "cluster_rank": i,
                                    "cluster_ring_port": 32700 + i,
                                    "cluster_unit_name": f"gate{i}",
                                }
                                | (rank2 if i == 2 else {})
                                for i in range(3)
                            },
                            "vars": {
                                "ansible_connection": "local",
                                "ansible_host": "127.0.0.1",
                                "cluster_ips": ["127.0.0.1"],
                                "ansible_python_interpreter": sys.executable,
                                "cluster_python": sys.executable,
                                "cluster_backend": "ring",
                                "cluster_model_source": "local",
                                "cluster_model_name": "m",
                                "cluster_model_local_path": str(tmp_path / "model"),
                                "cluster_api_host": "127.0.0.1",
                                "cluster_install_prefix": str(tmp_path / "prefix"),
                                "cluster_model_path": str(tmp_path / "prefix/m"),
                                "cluster_controller_cache": str(tmp_path / "cache"),
                            },
                        }
                    }
                }
            }
        )
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_attention_heads": 3, "num_key_value_heads": 3})
    )
    return path


def run(tmp_path: Path, inv: Path, playbook: Path | str, *args: str) -> tuple[int, str]:
    proc = ansible_playbook(playbook, *args, inventory=inv, rcs=None)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_host_dropped_in_an_earlier_play_stops_the_next_changing_play_by_name(tmp_path):
    """rank2 fails in a play without any_errors_fatal; Ansible would run the next play on the
    other two. cluster_gate names rank2 and nothing of the changing play runs."""
    marker = tmp_path / "changed"
    book = tmp_path / "book.yml"
    book.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Drop rank2",
                    "hosts": "mlx_cluster",
                    "gather_facts": False,
                    "roles": ["preflight"],  # as every playbook starts: the plan names the ranks
                    "tasks": [
                        {
                            "name": "rank2 fails",
                            "ansible.builtin.fail": {"msg": "gone"},
                            "when": "inventory_hostname == 'rank2'",
                        }
                    ],
                },
                {
                    "name": "Change",
                    "hosts": "mlx_cluster",
                    "gather_facts": False,
                    "any_errors_fatal": True,
                    "max_fail_percentage": 0,
                    "roles": ["cluster_gate"],
                    "tasks": [
                        {
                            "name": "a change",
                            "ansible.builtin.file": {
                                "path": f"{marker}-{{{{ inventory_hostname }}}}",
                                "state": "touch",
                                "mode": "0644",
                            },
                        }
                    ],
                },
            ]
        )
    )
    rc, out = run(tmp_path, inventory(tmp_path), book)
    assert rc != 0
    assert "rank2 is no longer in the run" in out, out[-3000:]
    assert not list(tmp_path.glob("changed-*")), out[-3000:]


def test_limit_to_part_of_the_cluster_is_refused_before_any_change(tmp_path):
    rc, out = run(tmp_path, inventory(tmp_path), "site.yml", "--limit", "rank0,rank1")
    assert rc != 0
    assert "rank2 is no longer in the run" in out, out[-3000:]
    assert "PLAY [Provision" not in out and not (tmp_path / "prefix" / "venv").exists()


def test_an_unreachable_host_stops_site_in_readiness_before_mac_hygiene(tmp_path):
    """With a hygiene switch on and rank2 unreachable, no opt-in change runs anywhere."""
    inv = inventory(tmp_path, ansible_connection="ssh", ansible_port=1, ansible_ssh_common_args="-o ConnectTimeout=3")
    rc, out = run(tmp_path, inv, "site.yml", "-e", "mac_hygiene_power_enabled=true")
    assert rc != 0
    assert "fatal: [rank2]: UNREACHABLE" in out, out[-3000:]
    assert "PLAY [Mac hygiene" not in out and "PLAY [Provision" not in out, out[-3000:]
    assert not (tmp_path / "prefix").exists()
