#!/usr/bin/env python3
"""What a memray capture's window allocated and still held when tracking stopped, by stack.

    python benchmarks/heap_leaks.py CAPTURE.bin [TOP] [DEPTH]

The capture comes from a rank run with ``benchmarks/heapprof`` first on ``PYTHONPATH`` and
``MEMPROF_OUT`` set (SIGUSR1 starts tracking, SIGUSR2 stops it; see that module). Prints the
held total, then the held bytes by first native caller and by first Python caller, then the
TOP largest stacks. This is a measuring script, not a test.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from memray import AllocatorType, FileReader

GENERIC = (
    "operator new",
    "malloc",
    "calloc",
    "realloc",
    "memalign",
    "allocate",
    "Allocator",
    "allocator",
    "<unknown>",
    "std::",
    "__gnu_cxx",
)


def frames(rec, depth: int) -> list:
    try:
        return list(rec.hybrid_stack_trace(max_stacks=depth))
    except Exception:  # a capture without native traces
        return list(rec.stack_trace(max_stacks=depth))


def first(fs: list, python: bool) -> str:
    for func, path, line in fs:
        is_py = str(path).endswith(".py")
        if python and is_py:
            return f"{func} ({str(path).split('site-packages/')[-1]}:{line})"
        if not python and not is_py and not any(g in str(func) for g in GENERIC):
            return str(func)[:150]
    return "?"


def op(fs: list) -> str:
    """The MLX operation (or cuDNN/graph step) an allocation was made for, with the CUDA call."""
    cuda = next((str(f) for f, _, _ in fs if str(f).startswith(("cu", "cudnn"))), "")
    for func, _, _ in fs:
        name = str(func)
        if "mlx::core::" in name and any(
            t in name for t in ("::eval_gpu", "::eval_cpu", "sdpa_", "DnnGraph::", "CudaGraphExec::")
        ):
            return f"{name.split('(')[0]} <- {cuda.split('(')[0]}"
    return f"? <- {cuda.split('(')[0]}"


def main() -> int:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    depth = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    reader = FileReader(path)
    meta = reader.metadata
    print(f"{path}: pid {meta.pid}, {meta.start_time} -> {meta.end_time}, native {meta.has_native_traces}")
    recs = list(reader.get_leaked_allocation_records(merge_threads=True))
    total = sum(r.size for r in recs)
    print(
        f"held at stop: {total / 2**20:.1f} MB in {sum(r.n_allocations for r in recs)} allocations, {len(recs)} stacks"
    )
    stacks = {id(r): frames(r, depth) for r in recs}
    for python in (False, True):
        by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in recs:
            entry = by[first(stacks[id(r)], python)]
            entry[0] += r.size
            entry[1] += r.n_allocations
        print(f"\nby first {'Python' if python else 'native'} caller:")
        for name, (size, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {size / 2**20:9.2f} MB {n:8d}  {name}")
    by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in recs:
        entry = by_op[op(stacks[id(r)])]
        entry[0] += r.size
        entry[1] += r.n_allocations
    print("\nby MLX operation <- CUDA or cuDNN call (none on CPU):")
    for name, (size, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {size / 2**20:9.2f} MB {n:8d}  {name[:160]}")
    for r in sorted(recs, key=lambda r: -r.size)[:top]:
        print(f"\n{r.size / 2**20:.2f} MB in {r.n_allocations} ({AllocatorType(r.allocator).name})")
        for func, fpath, line in stacks[id(r)]:
            print(f"    {str(func)[:120]}  {str(fpath).split('/')[-1]}:{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
