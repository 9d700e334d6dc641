#!/usr/bin/env python3
"""Per-token mask cost of constrained-decoding libraries on one real tokenizer (CPU).

For each library that is installed, one JSON schema is compiled for the tokenizer, then a
fixed valid JSON answer is walked token by token: at each step the library computes the
set of allowed next tokens (as the engine must, before sampling) and then advances by the
answer's next token. Reports compile time and the median / p99 per-token mask time.
Libraries: llguidance (``LLMatcher.compute_bitmask``), outlines-core (``Index`` +
``Guide.get_tokens``), lm-format-enforcer (``TokenEnforcer.get_allowed_tokens``).
xgrammar is left out: its wheels pull torch, transformers and apache-tvm-ffi.

    python benchmarks/grammar_candidates.py --tokenizer /tmp/smollm2 --out /tmp/candidates.json

Run it in a venv that has the candidates (they are not project dependencies):
``uv pip install llguidance outlines-core lm-format-enforcer transformers``.
A measuring script, not a test. Figures: docs/structured-output.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["admin", "user"],
    "address": {"city": "London", "zip": "12345"},
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def token_bytes(hf) -> dict[bytes, list[int]]:
    """Each regular token's bytes (byte-level BPE: GPT-2's character map undone)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from mlx_jaccl_cluster.models.tiny import _byte_decoder

    dec = _byte_decoder()
    special = set(hf.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for token, i in hf.get_vocab().items():
        if i in special:
            continue
        out.setdefault(bytes(dec[c] for c in token), []).append(i)
    return out


def summary(name: str, compile_s: float, steps: list[float], version: str) -> dict:
    return {
        "library": name,
        "version": version,
        "compile_ms": compile_s * 1000,
        "tokens": len(steps),
        "mask_us_median": statistics.median(steps) * 1e6,
        "mask_us_p99": pct(steps, 99) * 1e6,
    }


def bench_llguidance(hf, text: str, eos: int) -> dict:
    import llguidance
    import llguidance.hf

    tok = llguidance.hf.from_tokenizer(hf, eos_token=eos)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, overrides={"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    )
    matcher = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t
    steps = []
    for token in hf.encode(text, add_special_tokens=False):
        t = time.perf_counter()
        matcher.compute_bitmask()
        steps.append(time.perf_counter() - t)
        assert matcher.consume_token(token), matcher.get_error()
    return summary("llguidance", compile_s, steps, llguidance.__version__)


def bench_outlines_core(hf, text: str, eos: int) -> dict:
    import importlib.metadata

    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t = time.perf_counter()
    vocab = Vocabulary(eos, token_bytes(hf))
    regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    index = Index(regex, vocab)
    guide = Guide(index)
    compile_s = time.perf_counter() - t
    steps = []
    for token in hf.encode(text, add_special_tokens=False):
        t = time.perf_counter()
        guide.get_tokens()
        steps.append(time.perf_counter() - t)
        guide.advance(token)
    return summary("outlines-core", compile_s, steps, importlib.metadata.version("outlines-core"))


def bench_lmfe(hf, text: str, eos: int) -> dict:
    import importlib.metadata

    from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

    t = time.perf_counter()
    # What its transformers integration builds (that module imports torch): each regular
    # token's text, with its leading space when it starts a word.
    zero = hf.encode("0", add_special_tokens=False)[-1]
    special = set(hf.all_special_ids)
    regular = []
    for i in range(len(hf)):
        if i in special:
            continue
        after_zero = hf.decode([zero, i])[1:]
        regular.append((i, after_zero, len(after_zero) > len(hf.decode([i]))))
    data = TokenEnforcerTokenizerData(regular, lambda ids: hf.decode(ids).rstrip("\ufffd"), eos, False, len(hf))
    enforcer = TokenEnforcer(data, JsonSchemaParser(SCHEMA))
    compile_s = time.perf_counter() - t
    steps, prefix = [], []
    for token in hf.encode(text, add_special_tokens=False):
        t = time.perf_counter()
        enforcer.get_allowed_tokens(prefix)
        steps.append(time.perf_counter() - t)
        prefix.append(token)
    return summary("lm-format-enforcer", compile_s, steps, importlib.metadata.version("lm-format-enforcer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a model folder with tokenizer.json")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(opts.tokenizer))
    text = json.dumps(ANSWER)
    rows = []
    for fn in (bench_llguidance, bench_outlines_core, bench_lmfe):
        try:
            rows.append(fn(hf, text, hf.eos_token_id))
        except Exception as exc:  # a candidate that is missing or fails is reported, not fatal
            rows.append({"library": fn.__name__[6:], "error": f"{type(exc).__name__}: {exc}"})
    print(f"vocabulary {len(hf)} tokens; answer {len(hf.encode(text, add_special_tokens=False))} tokens")
    for r in rows:
        if "error" in r:
            print(f"{r['library']:>20}: {r['error']}")
        else:
            print(
                f"{r['library']:>20} {r['version']:>8}: compile {r['compile_ms']:8.1f} ms, mask per token "
                f"median {r['mask_us_median']:8.1f} us, p99 {r['mask_us_p99']:8.1f} us"
            )
    if opts.out:
        opts.out.write_text(json.dumps({"vocabulary": len(hf), "schema": SCHEMA, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
