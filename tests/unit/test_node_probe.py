"""The node probe reads service managers and ps right, and the link speed comes from ibv_devinfo -v."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_jaccl_cluster.ops import macos, manifest, node_probe

CAPTURES = Path(__file__).parent / "captures"


def capture(name: str) -> str:
    return (CAPTURES / name).read_text()


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("00:36", 36),
        ("  01:02:03\n", 3723),
        ("2-00:00:01", 172801),
        ("10:00", 600),
        ("", None),
        ("bogus", None),
    ],
)
def test_ps_etime(text, seconds):
    assert node_probe.parse_etime(text) == seconds


def test_supervisor_running_and_stopped():
    assert node_probe.parse_supervisor_status(capture("ops/supervisorctl_status_running.txt")) == {
        "state": "RUNNING",
        "pid": 23536,
    }
    assert node_probe.parse_supervisor_status(capture("ops/supervisorctl_status_stopped.txt")) == {
        "state": "STOPPED",
        "pid": None,
    }
    assert node_probe.parse_supervisor_status("unix:///x/run/supervisor.sock no such file\n")["state"] == "unknown"


def test_systemctl_show():
    assert node_probe.parse_systemctl_show(capture("ops/systemctl_show_running.txt")) == {
        "state": "active/running",
        "pid": 4242,
    }
    assert node_probe.parse_systemctl_show(capture("ops/systemctl_show_not_found.txt")) == {
        "state": "not-installed",
        "pid": None,
    }


def test_launchctl_print_reads_the_top_level_state_and_pid():
    assert node_probe.parse_launchctl_print(capture("ops/launchctl_print_running.txt")) == {
        "state": "running",
        "pid": 812,
    }
    assert node_probe.parse_launchctl_print(capture("ops/launchctl_print_waiting.txt")) == {
        "state": "not running",
        "pid": None,
    }


def test_tb5_link_speed_from_ibv_devinfo_v():
    devinfo = macos.parse_ibv_devinfo(capture("macos/ibv_devinfo_v_ipv4.txt"))
    assert macos.port_link_gbps(devinfo["rdma_en4"]["ports"][1]) == macos.TB5_GBPS
    assert macos.link_gbps(devinfo) == macos.TB5_GBPS
    assert macos.link_gbps(devinfo, ["rdma_en5"]) is None


def test_link_speed_unknown_without_verbose_output_or_active_port():
    assert macos.link_gbps(macos.parse_ibv_devinfo(capture("macos/ibv_devinfo_one_active.txt"))) is None
    assert macos.link_gbps(macos.parse_ibv_devinfo(capture("macos/ibv_devinfo_one_down.txt"))) is None
    assert macos.port_link_gbps({"active_speed": "10.0 Gbps", "active_width": "4X"}) == 40.0


def test_model_state_verifies_against_the_manifest(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    wanted = tmp_path / "manifest.json"
    import json

    wanted.write_text(json.dumps(manifest.build(model)))
    before = sorted(p.name for p in model.iterdir())
    state = node_probe.model_state(str(model), str(wanted))  # never verified on this node: status does not hash
    assert not state["verified"] and "make models-check" in state["problems"][0]
    assert sorted(p.name for p in model.iterdir()) == before  # and writes nothing
    assert manifest.problems(model, json.loads(wanted.read_text())) == []  # what site.yml / models-check do
    whole = {"present": True, "verified": True, "problems": [], "share": None, "label": None}
    assert node_probe.model_state(str(model), str(wanted)) == whole
    (model / "config.json").write_text('{"changed": true}')
    state = node_probe.model_state(str(model), str(wanted))
    assert state["present"] and not state["verified"] and state["problems"]
    assert node_probe.model_state(str(tmp_path / "gone"), str(wanted))["present"] is False
    for junk in ("null", "[1, 2]", "not json"):  # a damaged manifest is a problem named, not a crash
        wanted.write_text(junk)
        state = node_probe.model_state(str(model), str(wanted))
        assert not state["verified"] and "manifest" in state["problems"][0], state


def test_supervisord_without_its_config_is_not_installed(tmp_path):
    state = node_probe.service_state("supervisord", "rank0", str(tmp_path), "")
    assert state == {"state": "not-installed", "pid": None, "running": False, "uptime_s": None}


def test_the_probe_runs_here(tmp_path):
    info = node_probe.platform_info()
    assert info["system"] and info["memory_bytes"] > 0 and info["cpus"] >= 1
    assert node_probe.versions(str(tmp_path))["mlx-jaccl-cluster"]
    assert node_probe.disk_free(str(tmp_path / "not" / "yet")) > 0


def test_model_state_names_a_nodes_share_and_the_file_it_lacks(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"):
        (model / name).write_text(name)
    share = manifest.node_manifest(
        manifest.build(model), ["config.json", "model-00003-of-00004.safetensors"], [[6, 12]]
    )
    share["of_files"] = 7
    (model / "model-00002-of-00004.safetensors").unlink()  # another node's file: gone after a sync
    wanted = tmp_path / "manifest.json"
    wanted.write_text(json.dumps(share))
    assert manifest.problems(model, share) == []  # what the model role does after a copy
    state = node_probe.model_state(str(model), str(wanted))
    assert state == {
        "present": True,
        "verified": True,
        "problems": [],
        "share": {"files": 2, "of_files": 7, "layers": [[6, 12]]},
        "label": "share 2 of 7 files (layers 6-11)",
    }
    (model / "model-00003-of-00004.safetensors").unlink()
    state = node_probe.model_state(str(model), str(wanted))
    assert not state["verified"] and state["problems"] == ["model-00003-of-00004.safetensors: missing"]
    assert state["label"] == "share 2 of 7 files (layers 6-11)"
    gone = node_probe.model_state(str(tmp_path / "gone"), str(wanted))
    assert not gone["present"] and gone["label"] == "share 2 of 7 files (layers 6-11)"
