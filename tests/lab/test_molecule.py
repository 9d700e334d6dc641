"""`molecule test` of molecule/default: site.yml over SSH on three namespace hosts.

The scenario brings up the lab (molecule/lab/labctl) and a tiny model, converges the real
site.yml (systemd user units), converges again and requires changed=0, runs the testinfra
verify (molecule/default/tests) and takes the lab down. This test runs it in a fresh
ephemeral folder, prints how long each step took, and on failure prints the failed verify
tests from their JUnit report (Molecule indents pytest's own output) and the end of
Molecule's output. Linux and root only; about 4 minutes on 2 busy cores.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABCTL = REPO / "molecule" / "lab" / "labctl"
BIN = Path(sys.executable).parent
TIMEOUT_S = 1200
STEP = re.compile(r"\[default > (\w+)\] Executing$")
BORDER = re.compile(r"^\s*[│┌└]\s?")  # Molecule's frame around a command's output
TAIL_LINES = 120

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="builds namespaces: Linux and root only"),
    pytest.mark.skipif(not (BIN / "molecule").exists(), reason="molecule is not installed next to this Python"),
]


def run_molecule(args: list[str], ephemeral: Path) -> tuple[int | None, list[tuple[float, str]]]:
    """Run molecule; (return code or None on timeout, [(seconds since start, line)])."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MOLECULE_EPHEMERAL_DIRECTORY": str(ephemeral),
        "NO_COLOR": "1",
        "PY_COLORS": "0",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "molecule"), *args],
        cwd=REPO,
        env=env,
        text=True,
        errors="replace",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []
    timed_out = []

    def kill_on_timeout(signum, frame):
        timed_out.append(True)
        os.killpg(proc.pid, signal.SIGKILL)  # molecule and the ansible-playbook it runs

    previous = signal.signal(signal.SIGALRM, kill_on_timeout)
    signal.alarm(TIMEOUT_S)
    try:
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
        rc = proc.wait()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return (None if timed_out else rc), lines


def step_seconds(lines: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(step, seconds from its "Executing" line to the next step's, the last one's to the end)."""
    starts = [(m.group(1), t) for t, line in lines if (m := STEP.search(line))]
    end = lines[-1][0] if lines else 0.0
    return [(name, (starts[i + 1][1] if i + 1 < len(starts) else end) - t) for i, (name, t) in enumerate(starts)]


def verify_failures(junit: Path) -> str:
    """Each failed verify test with its message and captured output (rank logs)."""
    if not junit.exists():
        return "(verify did not run: no JUnit report)"
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = [f"verify: {s.get('tests')} tests, {s.get('failures')} failed, {s.get('errors')} errors" for s in suites]
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            out.append(f"\n=== {case.get('classname')}::{case.get('name')}\n{bad.text or bad.get('message', '')}")
            captured = case.find("system-out")
            if captured is not None and (captured.text or "").strip():
                out.append(f"--- captured output\n{captured.text.strip()}")
    return "\n".join(out)


def test_molecule_test_passes(tmp_path):
    ephemeral = tmp_path / "molecule"
    lines: list[tuple[float, str]] = []
    log = tmp_path / "molecule-test.log"  # the whole output, each line with its time
    try:
        rc, lines = run_molecule(["test"], ephemeral)
    finally:  # the scenario's destroy normally did this; after a timeout it did not
        log.write_text("".join(f"{t:8.2f} {BORDER.sub('', line)}\n" for t, line in lines))
        try:
            subprocess.run(
                [sys.executable, str(LABCTL), "down", "--state-dir", str(ephemeral / "lab")],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            print(f"labctl down took over 300 s; run it again: {LABCTL} down --state-dir {ephemeral / 'lab'}")
    print("\nmolecule test steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in step_seconds(lines)))
    if rc == 0:
        return
    tail = "\n".join(BORDER.sub("", line) for _, line in lines[-TAIL_LINES:])
    why = f"timed out after {TIMEOUT_S} s" if rc is None else f"exited {rc}"
    pytest.fail(
        f"molecule test {why}\n\n{verify_failures(ephemeral / 'verify-junit.xml')}\n\n"
        f"--- last {TAIL_LINES} lines of molecule's output (all of it: {log})\n{tail}",
        pytrace=False,
    )
