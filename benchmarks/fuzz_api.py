#!/usr/bin/env python3
"""Property-based fuzz of a running server's whole OpenAPI schema (schemathesis), then a health check.

Every operation of ``/openapi.json`` gets generated requests, valid and invalid (the
negative phase), and each answer is checked: no 5xx, a status the schema documents, its
documented content type and body shape (so every error is in the API's own
``{"error": {...}}`` shape), and invalid data refused. Afterwards ``/health`` must be 200.

    benchmarks/fuzz_api.py http://127.0.0.1:8080 --key KEY --examples 500 --max-time 1800

The CI test (tests/runtime/test_fuzz.py) runs it with a few hundred cases against a
1-rank tiny model; run it longer against a real cluster before a release. Exit status:
schemathesis's (0: nothing found), or 3 when the server is not healthy afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
HERE = Path(__file__).resolve().parent


def command(
    url: str,
    *,
    key: str | None,
    examples: int,
    max_time: float | None,
    seed: int,
    report: Path | None,
    workers: int = 1,
) -> list[str]:
    st = Path(sys.executable).with_name("st")
    argv = [
        str(st) if st.exists() else "st",
        "run",
        f"{url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--request-timeout",
        "120",
        "--no-color",
    ]
    if max_time:
        argv += ["--max-time", str(int(max_time))]
    if key:
        argv += ["--header", f"Authorization: Bearer {key}"]
    if report:
        argv += ["--report", "junit", "--report-dir", str(report)]
    return argv


def run(
    url: str,
    *,
    key: str | None = None,
    examples: int = 100,
    max_time: float | None = None,
    seed: int = 1,
    report: Path | None = None,
    max_tokens: int = 8,
) -> tuple[int, str]:
    """Run the fuzz; returns (exit status, its output)."""
    env = os.environ | {
        "SCHEMATHESIS_HOOKS": "fuzz_hooks",
        "FUZZ_MAX_TOKENS": str(max_tokens),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        command(url, key=key, examples=examples, max_time=max_time, seed=seed, report=report),
        env=env,
        capture_output=True,
        text=True,
    )
    output = proc.stdout + proc.stderr
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
            healthy = r.status == 200 and json.loads(r.read()).get("status") == "ok"
    except OSError:
        healthy = False
    if not healthy:
        return 3, output + "\nthe server is not healthy after the fuzz run"
    return proc.returncode, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the API's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--key", default=os.environ.get("MJC_API_KEY"), help="API key (default: $MJC_API_KEY)")
    parser.add_argument("--examples", type=int, default=500, help="most generated cases per operation and phase")
    parser.add_argument("--max-time", type=float, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8, help="cap on generated max_tokens")
    parser.add_argument("--report", type=Path, help="folder for a JUnit report")
    opts = parser.parse_args()
    code, output = run(
        opts.url.rstrip("/"),
        key=opts.key,
        examples=opts.examples,
        max_time=opts.max_time,
        seed=opts.seed,
        report=opts.report,
        max_tokens=opts.max_tokens,
    )
    print(output)
    return code


if __name__ == "__main__":
    sys.exit(main())
