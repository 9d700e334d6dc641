"""site.yml refuses a bad inventory in preflight, names host, field and fix, and touches nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ansible_run import ansible_playbook

CASES = [
    ("duplicate ranks", {"cluster_rank": 0}, ["rank1: cluster_rank", "which rank0 already has", "own cluster_rank"]),
    ("unknown backend", {"cluster_backend": "carrier-pigeon"}, ["cluster_backend", "jaccl", "ring"]),
    ("port collision", {"cluster_api_port": 32400}, ["cluster_api_port", "cluster_control_port"]),
    ("hf without a repo", {"cluster_model_source": "hf"}, ["cluster_model_repo"]),
    (
        "open API without a key",
        {"cluster_api_host": "0.0.0.0"},
        ["mlx_cluster: cluster_api_host", "no cluster_api_key", "openssl rand -hex 24", "cluster_api_allow_open: true"],
    ),
    ("short API key", {"cluster_api_key": "Zq9-shortkey"}, ["mlx_cluster: cluster_api_key", "has 12 characters"]),
    ("cluster IP typo", {"cluster_ips": ["127.0.0.l"]}, ["rank0: cluster_ips[0]", "not an IPv4 address"]),
]
SECRETS = ["Zq9-shortkey"]  # never printed, whatever the verbosity


@pytest.mark.parametrize("name,extra,words", CASES, ids=[c[0] for c in CASES])
def test_bad_inventory_stops_in_preflight_with_nothing_changed(tmp_path, name, extra, words):
    prefix = tmp_path / "prefix"
    extra = extra | {"cluster_install_prefix": str(prefix), "cluster_controller_cache": str(tmp_path / "cache")}
    proc = ansible_playbook("site.yml", inventory="inventory/local", extra=extra, rcs=None, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Preflight | every host and group setting is valid" in out
    assert "problem(s); nothing was changed" in out
    for word in words:
        assert word in out, f"{word!r} missing from:\n{out[-3000:]}"
    assert "TASK [node_readiness" not in out and "TASK [python_env" not in out
    assert not any(secret in out for secret in SECRETS)
    assert not prefix.exists()
    assert not (tmp_path / "cache").exists()


def site_with_model(tmp_path: Path, config: dict, group_vars: dict) -> tuple[int, str]:
    """site.yml on two local ranks serving a model folder that holds only ``config``."""
    model = tmp_path / "smol"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    inventory = two_rank_inventory(tmp_path, model, group_vars)
    proc = ansible_playbook("site.yml", inventory=inventory, rcs=None, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_split_the_model_cannot_take_is_refused_by_name(tmp_path):
    """SmolLM2's 9 attention / 3 key-value heads do not split over 2 tensor ranks: the fix names
    the rank counts that work and auto (which pipelines it), before any node is contacted."""
    rc, out = site_with_model(
        tmp_path,
        {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30},
        {"cluster_parallel": "tensor"},
    )
    assert rc != 0
    assert "num_attention_heads (9) is not divisible by 2" in out and "[1, 3]" in out, out[-3000:]
    assert "set cluster_parallel: auto" in out, out[-3000:]
    assert "PLAY [Readiness" not in out and not (tmp_path / "prefix").exists()


def two_rank_inventory(tmp_path: Path, model: Path, group_vars: dict, extra_groups: dict | None = None) -> Path:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        "mlx_cluster": {
                            "hosts": {
                                f"r{i}": {
                                    "cluster_rank": i,
                                    "cluster_ring_port": 32600 + i,
                                    "cluster_unit_name": f"u{i}",
                                }
                                for i in range(2)
                            },
                            "vars": {
                                "ansible_connection": "local",
                                "ansible_host": "127.0.0.1",
                                "cluster_ips": ["127.0.0.1"],
                                "cluster_backend": "ring",
                                "cluster_model_source": "local",
                                "cluster_model_local_path": str(model),
                                "cluster_model_name": "smol",
                                "cluster_install_prefix": str(tmp_path / "prefix"),
                                "cluster_api_host": "127.0.0.1",
                                "cluster_controller_cache": str(tmp_path / "cache"),
                                "cluster_model_path": str(tmp_path / "prefix" / "models" / "smol"),
                            }
                            | group_vars,
                        },
                        **(extra_groups or {}),
                    }
                }
            }
        )
    )
    return inventory


def test_a_pipeline_longer_than_the_model_stops_on_the_controller(tmp_path):
    """Every model with a layer stack pipelines (mlx-lm's split or the generic one), but not over
    more ranks than it has layers: the Controller play says so, before any node is contacted."""
    rc, out = site_with_model(
        tmp_path,
        {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 1},
        {"cluster_parallel": "pipeline"},
    )
    assert rc != 0
    assert "cluster_parallel: is pipeline over 2 ranks but the model has only 1 layers" in out, out[-3000:]
    assert "PLAY [Readiness" not in out and not (tmp_path / "prefix").exists()


def test_a_value_set_by_a_second_group_is_blamed_on_that_group(tmp_path):
    """r1 is also in group 'fast', whose vars set another API port: the message names group fast, not r1."""
    inventory = two_rank_inventory(
        tmp_path, tmp_path / "smol", {}, {"fast": {"hosts": {"r1": None}, "vars": {"cluster_api_port": 9000}}}
    )
    proc = ansible_playbook("site.yml", inventory=inventory, rcs=None, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "r1: cluster_api_port: is the number 9000 on this host (set by group fast)" in out, out[-3000:]
    assert "remove it from group fast" in out, out[-3000:]
