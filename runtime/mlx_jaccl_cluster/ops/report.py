"""Bench results on the controller: one table, written as JSON, CSV, markdown and a PNG chart.

``playbooks/bench.yml`` calls this once the ranks are done (link mode: rank 0's
``mjc-bench`` JSON; api mode: :mod:`mlx_jaccl_cluster.ops.apibench`'s JSON)::

    python -m mlx_jaccl_cluster.ops.report --input rank0.json --dest results/2026-11-26-local \\
        [--link-gbps 80] [--label local]

It writes ``<kind>.json``, ``<kind>.csv``, ``<kind>.md`` and ``<kind>.png`` under ``--dest``
and prints the table. Standard library only, except matplotlib for the chart.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OVERHEAD_LIMIT_PCT = 5.0


def human_bytes(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}B"
    return f"{n} B"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned for a terminal (numbers right, text left)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --- link mode -------------------------------------------------------------------------------

LINK_HEADERS = ["op", "size", "iters", "median us", "p99 us", "avg Gb/s", "peak Gb/s", "% link", "bare us", "vs bare %"]


def _pct_link(gbps: float | None, link_gbps: float | None) -> float | None:
    return gbps / link_gbps * 100 if gbps is not None and link_gbps else None


def link_rows(result: dict, link_gbps: float | None = None) -> list[list[Any]]:
    """One row per measurement: latency, every all_sum size, all_gather sizes, send/recv pairs."""
    lat = result["latency"]
    rows: list[list[Any]] = [
        [
            "latency (1 elem)",
            "4 B",
            lat["iters"],
            lat["median_s"] * 1e6,
            lat["p99_s"] * 1e6,
            None,
            None,
            None,
            None,
            None,
        ]
    ]
    for r in result["all_sum"]:
        rows.append(
            [
                "all_sum",
                human_bytes(r["bytes"]),
                r["iters"],
                r["median_s"] * 1e6,
                r["p99_s"] * 1e6,
                r["avg_gbps"],
                r["peak_gbps"],
                _pct_link(r["peak_gbps"], link_gbps),
                r["bare"]["median_s"] * 1e6,
                r["overhead_pct"],
            ]
        )
    for r in result.get("all_gather", []):
        rows.append(
            [
                "all_gather",
                human_bytes(r["bytes"]),
                r["iters"],
                r["median_s"] * 1e6,
                r["p99_s"] * 1e6,
                r["avg_gbps"],
                r["peak_gbps"],
                _pct_link(r["peak_gbps"], link_gbps),
                None,
                None,
            ]
        )
    for r in result.get("pairs", []):
        rows.append(
            [
                f"send {r['src']}->{r['dst']}",
                human_bytes(r["bytes"]),
                r["iters"],
                r["median_s"] * 1e6,
                None,
                r["median_gbps"],
                None,
                _pct_link(r["median_gbps"], link_gbps),
                None,
                None,
            ]
        )
    return rows


def link_findings(result: dict, slow_pair_ratio: float = 0.5) -> list[str]:
    """What a reader should look at: overhead against the bare loop, and a pair much slower than the others."""
    notes = []
    for r in result["all_sum"]:
        if abs(r["overhead_pct"]) > OVERHEAD_LIMIT_PCT:
            notes.append(
                f"all_sum {human_bytes(r['bytes'])}: median {r['overhead_pct']:+.1f}% against the bare loop "
                f"(limit {OVERHEAD_LIMIT_PCT:.0f}%: a noisy machine, or rerun with more --rounds)"
            )
    if result.get("pairs_skipped"):
        notes.append(f"send/recv pairs not timed on {result.get('backend')}: {result['pairs_skipped']}")
    speeds = [p["median_gbps"] for p in result.get("pairs", []) if p.get("median_gbps")]
    if len(speeds) > 1:
        best = max(speeds)
        for p in result["pairs"]:
            if p.get("median_gbps") and p["median_gbps"] < best * slow_pair_ratio:
                notes.append(
                    f"send/recv {p['src']}->{p['dst']} runs at {p['median_gbps']:.2f} Gb/s, under "
                    f"{slow_pair_ratio:.0%} of the best pair ({best:.2f} Gb/s): check that cable"
                )
    return notes


def link_chart(result: dict, path: Path, link_gbps: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["bytes"] for r in result["all_sum"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(sizes, [r["avg_gbps"] for r in result["all_sum"]], "o-", label="all_sum average")
    ax.plot(sizes, [r["peak_gbps"] for r in result["all_sum"]], "s--", label="all_sum peak")
    ax.plot(
        sizes, [r["bare"]["avg_gbps"] for r in result["all_sum"]], ":", color="grey", label="bare MLX loop (average)"
    )
    if link_gbps:
        ax.axhline(link_gbps, color="red", linewidth=1, label=f"link {link_gbps:g} Gb/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [human_bytes(s) for s in sizes], rotation=45, fontsize=8)
    ax.set_xlabel("message size")
    ax.set_ylabel("Gb/s (message bytes / time)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- api mode --------------------------------------------------------------------------------

API_HEADERS = [
    "clients",
    "requests",
    "tokens",
    "aggregate tok/s",
    "per-client tok/s",
    "TTFT median ms",
    "TTFT p99 ms",
    "errors",
]


def api_rows(result: dict) -> list[list[Any]]:
    return [
        [
            r["clients"],
            r["requests"],
            r["completion_tokens"],
            r["aggregate_tps"],
            r["decode_tps_median"],
            r["ttft_ms_median"],
            r["ttft_ms_p99"],
            len(r["errors"]),
        ]
        for r in result["runs"]
    ]


def api_findings(result: dict) -> list[str]:
    return [f"{r['clients']} client(s): {e}" for r in result["runs"] for e in r["errors"][:3]]


def api_chart(result: dict, path: Path, _link_gbps: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in result["runs"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(
        [str(c) for c in clients], [r["aggregate_tps"] or 0 for r in result["runs"]], color="tab:blue", label="tok/s"
    )
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ttft = ax.twinx()
    ttft.plot([str(c) for c in clients], [r["ttft_ms_median"] or 0 for r in result["runs"]], "o-", color="tab:red")
    ttft.set_ylabel("TTFT median (ms)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KINDS = {
    "link": (LINK_HEADERS, link_rows, link_findings, link_chart),
    "api": (API_HEADERS, lambda result, _link: api_rows(result), api_findings, api_chart),
}


def write_report(
    result: dict, dest: Path, link_gbps: float | None = None, label: str = ""
) -> tuple[str, dict[str, Path]]:
    """Write the four files under ``dest``; return the printed table and the paths."""
    kind = result["kind"]
    headers, rows_of, findings_of, chart = KINDS[kind]
    rows = rows_of(result, link_gbps)
    findings = findings_of(result)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {ext: dest / f"{kind}.{ext}" for ext in ("json", "csv", "md", "png")}
    paths["json"].write_text(json.dumps(result | {"link_gbps": link_gbps, "label": label}, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)
    title = (
        f"{kind} bench {label} ({result.get('world_size', '?')} ranks, {result.get('backend', '?')}, {result['date']})"
    )
    note = "" if link_gbps else "\n\nLink speed unknown (not an RDMA cluster): no % of link peak."
    extra = "".join(f"\n- {f}" for f in findings)
    paths["md"].write_text(
        f"# {title}\n\n{markdown_table(headers, rows)}{note}\n" + (f"\n## Look at{extra}\n" if extra else "")
    )
    chart(result, paths["png"], link_gbps, title)
    printed = f"{title}\n{text_table(headers, rows)}" + (f"\nlook at:{extra}" if extra else "")
    return printed, paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_jaccl_cluster.ops.report", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", type=Path, required=True, help="bench JSON (link: rank 0's mjc-bench output; api: apibench's)"
    )
    p.add_argument("--dest", type=Path, required=True, help="results folder")
    p.add_argument("--link-gbps", type=float, default=None, help="link speed, for % of link peak")
    p.add_argument("--label", default="")
    opts = p.parse_args(argv)
    printed, paths = write_report(json.loads(opts.input.read_text()), opts.dest, opts.link_gbps, opts.label)
    print(printed)
    print("written: " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
