#!/usr/bin/env python3
"""The constrained decode step in-process, with the mask thread against without.

No ranks, no HTTP: the tiny random qwen2 (757-token vocabulary), the JSON schema of
structured_bench.py (an open string), greedy. Blocks of ``--tokens`` steps of one lone
sequence (``engine/single.py``) and of an 8-row batch (mlx-lm's ``BatchGenerator`` with
the grammar hook), each constrained with the next masks filled on the mask thread
(``GrammarBatch.ahead``) and without it (``apply`` fills them in the step), alternating,
plus an unconstrained lone block as the yardstick. Prints the median wall and process
CPU milliseconds per step of each.

    python benchmarks/grammar_step.py --repeats 6

A measuring script, not a test: it asserts nothing. docs/benchmarks-cpu.md has the figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=96)
    opts = parser.parse_args(argv)

    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler
    from structured_bench import LONG_SCHEMA

    from mlx_jaccl_cluster.engine import fastpath
    from mlx_jaccl_cluster.engine import grammar as hook
    from mlx_jaccl_cluster.engine.grammar import GrammarBatch
    from mlx_jaccl_cluster.engine.single import Lone, take_uid
    from mlx_jaccl_cluster.models.tiny import build_tiny_model
    from mlx_jaccl_cluster.structured import Grammars

    model, tok = load(str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-qwen2", arch="qwen2")))
    grammars = Grammars(tok, None, max_bytes=65536, max_depth=32)
    grammar = grammars.for_response_format("json_schema", LONG_SCHEMA, "response_format", reasoning_first=False)
    eos = sorted(tok.eos_token_ids)
    fastpath.install()
    masks = GrammarBatch(grammars.lltokenizer, grammars.vocab_size, eos)
    hook.install(masks)
    ahead = GrammarBatch.ahead
    prompt = tok.encode("Write a long story about a dragon.")
    n = opts.tokens

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def timed(step, count: int) -> tuple[float, float]:
        wall, used = time.perf_counter(), cpu()
        for _ in range(count):
            step()
        return 1000 * (time.perf_counter() - wall) / count, 1000 * (cpu() - used) / count

    def lone(constrained: bool, thread: bool) -> tuple[float, float]:
        GrammarBatch.ahead = ahead if thread else (lambda *a: None)
        gen = BatchGenerator(model, stop_tokens=[[t] for t in eos])
        uid = take_uid(gen)
        if constrained:
            masks.add(uid, grammar)
        seq = Lone(
            gen, uid, prompt, make_prompt_cache(model), [], n + 8, greedy_sampler, [], masks if constrained else None
        )
        for _ in range(4):
            seq.step()
        out = timed(seq.step, n)
        masks._join()
        masks.discard([uid])
        gen.close()
        return out

    def batch(thread: bool) -> tuple[float, float]:
        GrammarBatch.ahead = ahead if thread else (lambda *a: None)
        gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=8)
        uids = gen.insert([prompt] * 8, max_tokens=[n + 40] * 8)
        for uid in uids:
            masks.add(uid, grammar)
        for _ in range(12):
            gen.next()
        out = timed(gen.next, n // 2)
        masks._join()
        masks.discard(uids)
        gen.close()
        return out

    rows: dict[str, list[tuple[float, float]]] = {}
    for rep in range(opts.repeats):
        rows.setdefault("lone, unconstrained", []).append(lone(False, False))
        for thread in (True, False) if rep % 2 == 0 else (False, True):
            name = "mask thread" if thread else "filled in the step"
            rows.setdefault(f"lone, schema, {name}", []).append(lone(True, thread))
            rows.setdefault(f"8 rows, schema, {name}", []).append(batch(thread))
    GrammarBatch.ahead = ahead
    hook.install(None)
    masks.close()
    print(f"{'':>36} | wall ms/step (median) | CPU ms/step (median) | wall per block")
    for name, got in rows.items():
        walls = [w for w, _ in got]
        print(
            f"{name:>36} | {statistics.median(walls):>21.2f} | {statistics.median(c for _, c in got):>20.2f} | "
            f"{[round(w, 1) for w in walls]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
