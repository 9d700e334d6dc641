"""Build, on the controller, the wheelhouse nodes install from with ``--no-index``.

Nodes may have no internet. The controller downloads every wheel once per node platform
(OS, CPU, Python version), plus a wheel of this project built from the checkout, and
writes ``requirements.txt``. A stamp of the inputs makes a re-run a no-op.

    python -m mlx_jaccl_cluster.ops.wheelhouse --project ROOT --dest DIR --mlx-extra cpu \
        [--platform macosx_14_0_arm64 --python-version 3.12] [--supervisor]

Prints one JSON line: ``{"changed": bool, "dest": DIR, "wheels": N}``. Stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

STAMP = "stamp.json"
REQUIREMENTS = "requirements.txt"


def project_version(project: Path) -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (project / "pyproject.toml").read_text(), re.M)
    if not match:
        raise SystemExit(f"no version in {project / 'pyproject.toml'}")
    return match.group(1)


def source_digest(project: Path) -> str:
    """Digest of everything that goes into the project's wheel."""
    h = hashlib.sha256()
    files = [project / "pyproject.toml", *sorted((project / "runtime").rglob("*"))]
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
            h.update(str(path.relative_to(project)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def requirements(version: str, mlx_extra: str, supervisor: bool) -> list[str]:
    """The project pins mlx and mlx-lm itself; the platform extra is chosen here."""
    reqs = [f"mlx-jaccl-cluster=={version}", f"mlx[{mlx_extra}]" if mlx_extra else "mlx"]
    if supervisor:
        reqs.append("supervisor>=4.2")
    return reqs


def build(
    project: Path, dest: Path, mlx_extra: str, platform: str | None, python_version: str | None, supervisor: bool
) -> dict:
    version = project_version(project)
    reqs = requirements(version, mlx_extra, supervisor)
    stamp = {
        "source": source_digest(project),
        "requirements": reqs,
        "platform": platform,
        "python_version": python_version,
    }
    stamp_path = dest / STAMP
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return {"changed": False, "dest": str(dest), "wheels": len(list(dest.glob("*.whl")))}
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(project)], check=True)
    (dest / REQUIREMENTS).write_text("\n".join(reqs) + "\n")
    target = []
    if platform:
        target = ["--only-binary=:all:", "--platform", platform, "--implementation", "cp"]
    if python_version:
        target += ["--python-version", python_version]
    subprocess.run(
        [
            *pip,
            "download",
            "--quiet",
            "--dest",
            str(dest),
            "--find-links",
            str(dest),
            *target,
            "-r",
            str(dest / REQUIREMENTS),
        ],
        check=True,
    )
    stamp_path.write_text(json.dumps(stamp, indent=1) + "\n")
    return {"changed": True, "dest": str(dest), "wheels": len(list(dest.glob("*.whl")))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_jaccl_cluster.ops.wheelhouse", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--project", type=Path, required=True, help="the checkout (holds pyproject.toml)")
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--mlx-extra", default="cpu", help="mlx extra: cpu (Linux), cuda13, or '' (macOS Metal)")
    parser.add_argument("--platform", help="pip platform tag when the node differs from the controller")
    parser.add_argument("--python-version", help="node Python, e.g. 3.12")
    parser.add_argument("--supervisor", action="store_true", help="include supervisor (nodes without launchd/systemd)")
    args = parser.parse_args(argv)
    try:
        result = build(
            args.project.resolve(), args.dest, args.mlx_extra, args.platform, args.python_version, args.supervisor
        )
    except subprocess.CalledProcessError as exc:
        print(
            json.dumps(
                {"changed": False, "failed": True, "msg": f"{' '.join(exc.cmd[:6])} ... exited {exc.returncode}"}
            )
        )
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
