"""The status verdict: healthy when every rank runs and rank 0 sees them all; each fault named."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from mlx_jaccl_cluster.ops import status

GIB = 1024**3


def probe(pid: int, **over) -> dict:
    base = {
        "system": "Linux",
        "os": "Debian GNU/Linux",
        "os_version": "12",
        "chip": "AMD EPYC",
        "memory_bytes": 24 * GIB,
        "cpus": 2,
        "rdma": [],
        "service": {
            "manager": "supervisord",
            "unit": f"r{pid}",
            "state": "RUNNING",
            "pid": pid,
            "running": True,
            "uptime_s": 3723,
        },
        "model": {"present": True, "verified": True, "problems": []},
        "versions": {"mlx": "0.32.4", "mlx-lm": "0.32.2", "mlx-jaccl-cluster": "0.1.0", "wheelhouse": "abc"},
        "disk_free_bytes": 70 * GIB,
    }
    return base | over


HEALTHY = {
    "world_size": 2,
    "api_url": "http://127.0.0.1:8080",
    "health": {
        "status": 200,
        "json": {"status": "ok", "ranks_up": 2, "queue_depth": 0, "active": 0, "model": "m", "backend": "ring"},
    },
    "nodes": {
        "rank1": {"rank": 1, "ssh": "127.0.0.1", "rdma_devices": [], "probe": probe(11)},
        "rank0": {"rank": 0, "ssh": "127.0.0.1", "rdma_devices": [], "probe": probe(10)},
    },
}


def test_numbers_rendered_as_strings_read_the_same():
    """ansible-core before 2.19 renders templated numbers as strings."""
    doc = copy.deepcopy(HEALTHY)
    doc["world_size"], doc["health"]["status"] = "2", "200"
    assert status.evaluate(doc)[1] == []
    doc["health"]["status"] = "-1"
    assert status.evaluate(doc)[1] != []


def test_healthy_cluster_has_no_problems_and_rank_order():
    text, problems = status.evaluate(HEALTHY)
    assert problems == []
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["rank", "host", "os"]
    assert lines[2].split()[:2] == ["0", "rank0"] and lines[3].split()[:2] == ["1", "rank1"]
    assert "01:02:03" in lines[2] and "verified" in lines[2]
    assert "ranks up 2/2, queue depth 0" in text and text.endswith("healthy")


def broken(change) -> list[str]:
    doc = copy.deepcopy(HEALTHY)
    change(doc)
    return status.evaluate(doc)[1]


def _stopped(doc):
    doc["nodes"]["rank1"]["probe"]["service"] |= {"state": "STOPPED", "pid": None, "running": False}
    doc["health"] = {"status": 503, "json": {"status": "lost", "ranks_up": 1, "detail": "rank 1 lost"}}


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            _stopped,
            [
                "rank1: rank 1 is not running (supervisord says STOPPED)",
                "rank 0 /health at http://127.0.0.1:8080 answered 503: rank 1 lost",
            ],
        ),
        (
            lambda d: d["nodes"]["rank0"]["probe"]["versions"].update({"mlx": "0.31.0"}),
            ["version drift in mlx: 0.31.0 on rank0; 0.32.4 on rank1"],
        ),
        (
            lambda d: d["nodes"]["rank0"]["probe"]["model"].update(
                {"verified": False, "problems": ["a.safetensors differs"]}
            ),
            ["rank0: model not verified: a.safetensors differs"],
        ),
        (
            lambda d: d["nodes"]["rank1"].update(
                {"probe": None, "error": "not installed: /p/venv/bin/python is missing"}
            ),
            ["rank1: not installed: /p/venv/bin/python is missing"],
        ),
        (
            lambda d: d.update({"health": {"status": -1, "json": None, "msg": "Connection refused"}}),
            ["rank 0 /health at http://127.0.0.1:8080 answered nothing: Connection refused"],
        ),
        (lambda d: d["health"]["json"].update({"ranks_up": 1}), ["rank 0 sees 1 of 2 ranks up"]),
        (
            lambda d: d["nodes"]["rank0"]["probe"].update({"disk_free_bytes": GIB}),
            ["rank0: only 1.0 GiB free on the install prefix"],
        ),
    ],
)
def test_each_fault_is_named(change, expected):
    assert broken(change) == expected


def test_a_down_rdma_port_of_the_inventory_and_old_macos():
    def mac(doc):
        doc["nodes"]["rank0"] |= {"rdma_devices": ["rdma_en4"]}
        doc["nodes"]["rank0"]["probe"] |= {
            "system": "Darwin",
            "os": "macOS",
            "os_version": "26.1",
            "rdma": [
                {"device": "rdma_en4", "state": "PORT_DOWN", "gbps": None},
                {"device": "rdma_en5", "state": "PORT_DOWN", "gbps": None},
            ],
        }

    assert broken(mac) == [
        "rank0: rdma_en4 is PORT_DOWN, not PORT_ACTIVE (check the cable)",
        "rank0: macOS 26.1 is older than 26.2 (no RDMA)",
    ]


def test_the_command_exits_1_when_unhealthy(tmp_path):
    for doc, rc in ((HEALTHY, 0), (copy.deepcopy(HEALTHY) | {"health": {"status": 0}}, 1)):
        path = tmp_path / "doc.json"
        path.write_text(json.dumps(doc))
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_jaccl_cluster.ops.status", "--input", str(path)], capture_output=True, text=True
        )
        assert proc.returncode == rc, proc.stdout + proc.stderr


def test_a_node_holding_a_pipeline_share_says_so_and_a_file_it_lacks_is_named():
    doc = copy.deepcopy(HEALTHY)
    label = "share 3 of 7 files (layers 0-11)"
    doc["nodes"]["rank1"]["probe"]["model"] |= {
        "share": {"files": 3, "of_files": 7, "layers": [[0, 12]]},
        "label": label,
    }
    text, problems = status.evaluate(doc)
    assert problems == []
    row = next(line for line in text.splitlines() if line.split()[:2] == ["1", "rank1"])
    assert f"{label}, verified" in row
    doc["nodes"]["rank1"]["probe"]["model"] |= {
        "verified": False,
        "problems": ["model-00003-of-00007.safetensors: missing"],
    }
    text, problems = status.evaluate(doc)
    assert f"{label}, MISMATCH" in text
    assert problems == [f"rank1: model not verified: model-00003-of-00007.safetensors: missing ({label})"]
