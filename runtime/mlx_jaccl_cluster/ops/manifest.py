"""Model manifests: the size and sha256 of every file of a model folder.

The controller writes one next to the model it fetched; each node checks its copy
against it on the very path the runtime loads from. A node that serves pipeline stages
gets the manifest cut to its share (:func:`node_manifest`: ``of_files``, the whole model's
file count, and ``layers``, the layers its ranks run); then a weight file outside the share
is a problem too (an earlier layout's, which a sync removes), and every report names the
share (:func:`share_label`: "share 3 of 7 files (layers 0-11)"). Hashing a large model takes
minutes, so a successful check leaves a stamp (manifest digest + size and mtime of each
file); later checks re-hash only when a file changed.

    python -m mlx_jaccl_cluster.ops.manifest build DIR      # writes DIR/mjc-manifest.json
    python -m mlx_jaccl_cluster.ops.manifest verify DIR     # exit 0 verified, 1 not (says why)

Stdlib only: it runs on the controller and on nodes alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

MANIFEST = "mjc-manifest.json"
STAMP = ".mjc-verified"
_SKIP = {MANIFEST, STAMP}


def files(folder: Path) -> list[Path]:
    """The model's files in ``folder`` (not this module's manifest and stamps)."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP and not p.name.startswith(".mjc-")
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(folder: Path) -> dict:
    """Manifest of ``folder``: ``{"files": {relpath: {"size", "sha256"}}}``."""
    return {
        "files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files(folder)}
    }


def node_manifest(manifest: dict, files: list[str] | None, layers: list[list[int]] | None = None) -> dict:
    """What one node's copy is checked against: ``manifest`` itself when the node holds every
    file (``files`` None: tensor layouts, one-file models), else the manifest cut to ``files``
    (the plan's ``model_files``) with ``of_files`` (the whole model's count) and ``layers``
    (the plan's ``model_layers``: ``[start, end)`` of each stage the node's ranks run)."""
    if files is None:
        return manifest
    wanted = set(files)
    cut: dict = {
        "files": {rel: meta for rel, meta in manifest["files"].items() if rel in wanted},
        "of_files": len(manifest["files"]),
    }
    if layers:
        cut["layers"] = [list(stage) for stage in layers]
    return cut


def share_bytes(manifest: dict) -> int:
    """Bytes of the files a (node) manifest lists: what that node's disk must hold."""
    return sum(int(meta["size"]) for meta in manifest.get("files", {}).values())


def layer_ranges(layers: list[list[int]] | None) -> str:
    """``[[0, 6], [6, 12], [20, 24]]`` (``[start, end)`` stages) -> ``"0-11, 20-23"``."""
    merged: list[list[int]] = []
    for start, end in sorted(tuple(stage) for stage in layers or []):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return ", ".join(f"{s}-{e - 1}" if e - s > 1 else f"{s}" for s, e in merged)


def share_label(manifest: dict) -> str | None:
    """``"share 3 of 7 files (layers 0-11)"`` for a node's cut manifest; None for the whole model."""
    if "of_files" not in manifest:
        return None
    ranges = layer_ranges(manifest.get("layers"))
    return f"share {len(manifest.get('files', {}))} of {manifest['of_files']} files" + (
        f" (layers {ranges})" if ranges else ""
    )


def digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _quick_state(folder: Path, manifest: dict) -> dict:
    state = {}
    for rel in manifest["files"]:
        st = (folder / rel).stat()
        state[rel] = [st.st_size, st.st_mtime_ns]
    return state


def problems(folder: Path, manifest: dict, rehash: bool = True) -> list[str]:
    """Why ``folder`` does not match ``manifest`` (empty when it does). Uses the stamp when valid.

    ``rehash=False`` (read-only callers such as status) never hashes and never writes: a
    folder whose stamp is stale is reported as not verified since it changed."""
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    expected = manifest.get("files", {})
    issues = []
    for rel, meta in expected.items():
        path = folder / rel
        if not path.is_file():
            issues.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"]:
            issues.append(f"{rel}: {path.stat().st_size} bytes, expected {meta['size']}")
    if "of_files" in manifest:  # one node's share of a pipeline split: nothing else of the model
        issues += [
            f"{rel}: not this node's share of the model (an earlier layout's); a sync removes it"
            for rel in (str(p.relative_to(folder)) for p in files(folder))
            if rel.endswith(".safetensors") and rel not in expected
        ]
    if issues:
        return issues
    stamp_path = folder / STAMP
    current = _quick_state(folder, manifest)
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = None
    if isinstance(stamp, dict) and stamp.get("digest") == digest(manifest) and stamp.get("files") == current:
        return []
    if not rehash:
        seen = stamp.get("files") if isinstance(stamp, dict) and stamp.get("digest") == digest(manifest) else None
        if not isinstance(seen, dict):
            return ["not verified yet (sizes match; make models-check hashes every file)"]
        return [
            f"{rel}: changed since it was last verified (same size; make models-check hashes it)"
            for rel in expected
            if seen.get(rel) != current[rel]
        ]
    for rel, meta in expected.items():
        if sha256(folder / rel) != meta["sha256"]:
            issues.append(f"{rel}: sha256 differs")
    if not issues:
        try:
            stamp_path.write_text(json.dumps({"digest": digest(manifest), "files": _quick_state(folder, manifest)}))
        except OSError:
            pass  # a read-only folder: verified all the same, only not remembered
    return issues


def is_current(folder: Path) -> bool:
    """True when ``folder`` already holds a manifest of exactly its current files."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return listed == {str(p.relative_to(folder)) for p in files(folder)} and not problems(folder, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_jaccl_cluster.ops.manifest", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help=f"write DIR/{MANIFEST}")
    b.add_argument("folder", type=Path)
    v = sub.add_parser("verify", help="check DIR against a manifest; exit 1 with the reasons when it differs")
    v.add_argument("folder", type=Path)
    v.add_argument("--manifest", type=Path, help=f"manifest to check against (default: DIR/{MANIFEST})")
    args = parser.parse_args(argv)
    if args.command == "build":
        if not args.folder.is_dir():
            print(f"{args.folder} is not a folder", file=sys.stderr)
            return 2
        if is_current(args.folder):
            print(f"{args.folder / MANIFEST}: unchanged")
            return 0
        manifest = build(args.folder)
        (args.folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        print(
            f"{args.folder / MANIFEST}: {len(manifest['files'])} files, {sum(f['size'] for f in manifest['files'].values())} bytes"
        )
        return 0
    manifest_path = args.manifest or args.folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read manifest {manifest_path}: {exc}", file=sys.stderr)
        return 1
    issues = problems(args.folder, manifest)
    for issue in issues:
        print(issue)
    what = share_label(manifest) or f"the whole model, {len(manifest['files'])} files"
    print(f"{args.folder}: {what}, " + (f"NOT verified ({len(issues)} problem(s) above)" if issues else "verified"))
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
