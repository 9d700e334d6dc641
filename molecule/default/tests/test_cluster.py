"""A converged lab: one systemd user unit per host, the ring hostfile, the model, the API."""

from __future__ import annotations

import hashlib
import json

from conftest import UNIT, chat, http, unit_environment, unit_property

testinfra_hosts = ["ansible://mlx_cluster"]


# --- the service ---------------------------------------------------------------------------


def test_rank_unit_is_active(host):
    assert host.run(f"systemctl --user is-active {UNIT}").stdout.strip() == "active"


def test_rank_unit_is_enabled_so_it_starts_with_the_user_manager(host):
    assert host.run(f"systemctl --user is-enabled {UNIT}").stdout.strip() == "enabled"


def test_ranks_run_under_systemd_not_supervisord(host, lab):
    """cluster_service_manager auto picked systemd: `systemctl --user` answers here."""
    assert not host.file(f"{lab.prefix}/etc/supervisord.conf").exists
    assert host.run("pgrep -x supervisord").rc == 1


def test_unit_file_restarts_the_rank_always(host):
    lines = host.check_output(f"systemctl --user cat {UNIT}").splitlines()
    assert "Restart=always" in lines


def test_unit_file_gives_the_rank_of_this_host(host, me):
    lines = host.check_output(f"systemctl --user cat {UNIT}").splitlines()
    assert f'Environment="MLX_RANK={me.rank}"' in lines


def test_loaded_unit_restarts_the_rank_always(host):
    assert unit_property(host, "Restart") == "always"


def test_rank_process_runs_with_the_rank_of_this_host(host, me):
    pid = unit_property(host, "MainPID")
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
    assert f"MLX_RANK={me.rank}" in environ


# --- the ring hostfile -------------------------------------------------------------------------


def test_ring_hostfile_lists_every_rank_in_rank_order(host, lab):
    """MLX reads rank i's listen address from entry i: order is the rank order."""
    path = unit_environment(host)["MLX_HOSTFILE"]
    port = lab.settings.get("cluster_ring_port", 32500)
    assert json.loads(host.file(path).content_string) == [[f"{r.ip}:{port}"] for r in lab.ranks]


def test_ring_hostfile_is_the_same_file_on_every_node(lab):
    digests = {}
    for r in lab.ranks:
        node = lab.host(r.name)
        path = unit_environment(node)["MLX_HOSTFILE"]
        digests[r.name] = hashlib.sha256(node.file(path).content).hexdigest()
    assert len(set(digests.values())) == 1, digests


def test_launch_hostfile_names_every_rank_in_order(host, lab):
    hostfile = json.loads(host.file(f"{lab.prefix}/etc/hostfile.json").content_string)
    assert (hostfile["backend"], [(h["ssh"], h["ips"]) for h in hostfile["hosts"]]) == (
        "ring",
        [(r.ip, [r.ip]) for r in lab.ranks],
    )


# --- the model ------------------------------------------------------------------------------


def test_rank_loads_the_model_from_cluster_model_path(host, lab):
    assert unit_environment(host)["MJC_MODEL"] == lab.settings["cluster_model_path"]


def test_node_checks_its_model_against_the_controllers_manifest(host, lab):
    controller = json.loads((lab.ephemeral / "tiny-llama" / "mjc-manifest.json").read_text())
    node = json.loads(host.file(f"{lab.prefix}/etc/model-manifest.json").content_string)
    assert node == controller


def test_model_copy_verifies_on_the_path_the_rank_loads(host, lab):
    model = unit_environment(host)["MJC_MODEL"]
    verify = host.run(
        f"{lab.prefix}/venv/bin/python -m mlx_jaccl_cluster.ops.manifest verify {model} "
        f"--manifest {lab.prefix}/etc/model-manifest.json"
    )
    assert verify.rc == 0, verify.stdout + verify.stderr


# --- the API, from the controller ------------------------------------------------------------


def test_rank0_reports_every_rank_up(lab):
    status, health = http(f"{lab.api}/health", timeout=10)
    assert (status, health.get("ranks_up"), health.get("world_size")) == (200, len(lab.ranks), len(lab.ranks))


def test_chat_request_to_rank0_returns_text(lab):
    status, reply = chat(lab, "Say something about rings.", max_tokens=8)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"].strip()


def test_greedy_answers_are_the_same_twice(lab):
    """temperature 0 over three tensor-parallel ranks is deterministic."""
    first, second = (chat(lab, "Count to five.", max_tokens=6)[1] for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
