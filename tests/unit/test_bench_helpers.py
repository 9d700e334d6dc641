"""mjc-bench's size syntax, iteration budget and percentiles."""

from __future__ import annotations

import argparse

import pytest

from mlx_jaccl_cluster import bench


@pytest.mark.parametrize(
    "text, n", [("4K", 4096), ("16m", 16 << 20), ("256MB", 256 << 20), ("1G", 1 << 30), ("4096", 4096)]
)
def test_sizes(text, n):
    assert bench.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "K", "-4K", "4X", "0"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size(text)


def test_iterations_stay_within_bounds():
    assert bench.iterations(4096, 256 << 20, 3, 200) == 200
    assert bench.iterations(256 << 20, 256 << 20, 3, 200) == 3
    assert bench.iterations(1 << 20, 64 << 20, 3, 200) == 64


def test_percentile_and_summary():
    samples = [float(i) for i in range(1, 101)]
    assert bench.percentile(samples, 99) == 99.0 and bench.percentile(samples, 50) == 50.0
    assert bench.percentile([5.0], 99) == 5.0
    s = bench.summary([0.001, 0.002, 0.004], nbytes=1_000_000)
    assert s["median_s"] == 0.002 and s["min_s"] == 0.001 and s["p99_s"] == 0.004
    assert s["peak_gbps"] == pytest.approx(8.0) and s["median_gbps"] == pytest.approx(4.0)
    assert s["avg_gbps"] == pytest.approx(8e6 / (0.007 / 3) / 1e9)
    assert "avg_gbps" not in bench.summary([0.001])


def test_a_backend_without_send_recv_skips_the_pairs_and_says_why():
    """nccl has no send/recv (layout.NO_SEND_RECV): `make bench` on an nccl inventory must not
    fail its whole sweep on the first pair (bench_pairs_enabled is on by default)."""
    assert "send/recv" in bench.pairs_not_timed("nccl", 2, True)
    assert bench.pairs_not_timed("ring", 2, True) is None and bench.pairs_not_timed("jaccl", 4, True) is None
    assert bench.pairs_not_timed("nccl", 2, False) is None and bench.pairs_not_timed("nccl", 1, True) is None
