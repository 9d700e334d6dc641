"""Bench results become one table and four files (JSON, CSV, markdown, PNG) with the right figures."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

from mlx_jaccl_cluster.ops import report

# A real mjc-bench result: 3 ring ranks on this 2-core machine (loopback TCP).
LINK = json.loads((Path(__file__).parent / "captures" / "ops" / "link_ring_3ranks.json").read_text())
API = {
    "kind": "api",
    "date": "2026-11-26T01:00:00+00:00",
    "url": "http://127.0.0.1:8080",
    "model": "m",
    "runs": [
        {
            "clients": 1,
            "requests": 2,
            "completion_tokens": 128,
            "aggregate_tps": 40.0,
            "decode_tps_median": 41.0,
            "ttft_ms_median": 120.0,
            "ttft_ms_p99": 130.0,
            "errors": [],
        },
        {
            "clients": 4,
            "requests": 8,
            "completion_tokens": 512,
            "aggregate_tps": 90.0,
            "decode_tps_median": 23.0,
            "ttft_ms_median": 300.0,
            "ttft_ms_p99": 410.0,
            "errors": ["HTTP 429: queue full"],
        },
    ],
}


def test_human_bytes():
    assert [report.human_bytes(n) for n in (4, 4096, 256 << 20, 1 << 30, 1500)] == [
        "4 B",
        "4 KB",
        "256 MB",
        "1 GB",
        "1500 B",
    ]


def test_link_rows_cover_latency_sizes_gather_and_every_pair():
    rows = report.link_rows(LINK, link_gbps=80.0)
    ops = [r[0] for r in rows]
    assert ops[0] == "latency (1 elem)"
    assert ops.count("all_sum") == len(LINK["all_sum"]) and ops.count("all_gather") == len(LINK["all_gather"])
    assert sum(op.startswith("send ") for op in ops) == 3 * 2
    first = rows[1]
    size = LINK["all_sum"][0]
    assert first[3] == size["median_s"] * 1e6 and first[5] == size["avg_gbps"] and first[6] == size["peak_gbps"]
    assert first[7] == size["peak_gbps"] / 80.0 * 100
    assert report.link_rows(LINK)[1][7] is None  # no link speed: no % of link


def test_a_slow_pair_and_overhead_are_pointed_out():
    result = copy.deepcopy(LINK)
    for pair in result["pairs"]:
        pair["median_gbps"] = 10.0
    for size in result["all_sum"]:
        size["overhead_pct"] = 1.0
    assert report.link_findings(result) == []
    result["pairs"][3]["median_gbps"] = 2.0
    result["all_sum"][0]["overhead_pct"] = 12.0
    notes = report.link_findings(result)
    assert len(notes) == 2
    assert "4 KB" in notes[0] and "+12.0%" in notes[0]
    pair = result["pairs"][3]
    assert f"{pair['src']}->{pair['dst']}" in notes[1] and "cable" in notes[1]


def test_pairs_a_backend_could_not_time_are_a_finding():
    result = copy.deepcopy(LINK) | {"backend": "nccl", "pairs": [], "pairs_skipped": "no send/recv on nccl"}
    for size in result["all_sum"]:
        size["overhead_pct"] = 1.0
    assert report.link_findings(result) == ["send/recv pairs not timed on nccl: no send/recv on nccl"]


def test_write_report_link_writes_four_files(tmp_path):
    printed, paths = report.write_report(LINK, tmp_path / "run", link_gbps=80.0, label="lab")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["link.csv", "link.json", "link.md", "link.png"]
    assert json.loads(paths["json"].read_text())["link_gbps"] == 80.0
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == report.LINK_HEADERS and len(rows) == 1 + len(report.link_rows(LINK))
    md = paths["md"].read_text()
    assert md.startswith("# link bench lab (3 ranks, ring") and "| all_sum | 16 MB |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert printed.splitlines()[1].split()[:3] == ["op", "size", "iters"]


def test_write_report_api(tmp_path):
    printed, paths = report.write_report(API, tmp_path, label="local")
    assert {p.name for p in tmp_path.iterdir()} == {"api.json", "api.csv", "api.md", "api.png"}
    assert list(csv.reader(paths["csv"].open()))[2][:4] == ["4", "8", "512", "90.0"]
    assert "4 client(s): HTTP 429: queue full" in printed


def test_text_table_aligns_numbers_right():
    text = report.text_table(["a", "n"], [["x", 1.5], ["long", 10.25]])
    assert text.splitlines() == ["a         n", "----  -----", "x      1.50", "long  10.25"]
