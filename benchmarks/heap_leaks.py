#!/usr/bin/env python3
"""What a memray capture's window allocated and still held when tracking stopped, by stack.

    python benchmarks/heap_leaks.py CAPTURE.bin [TOP] [DEPTH]

The capture comes from a rank run with ``benchmarks/heapprof`` first on ``PYTHONPATH`` and
``MEMPROF_OUT`` set (SIGUSR1 starts tracking, SIGUSR2 stops it; see that module). Prints the
held total, then the held bytes grouped three ways: by first native caller (past the
allocator's own frames), by first Python caller, and by MLX operation with the CUDA or cuDNN
call that allocated (none on CPU); then the TOP largest stacks, DEPTH frames each. This is a
measuring script, not a test.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable

from memray import AllocatorType, FileReader

#: frames that only pass an allocation on: the allocator's own, and the C++ library's
ALLOCATOR_FRAMES = (
    "operator new",
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "std::",
    "__gnu_cxx::",
    "mlx::core::allocator::",
    "<unknown>",
)
#: MLX frames that name what an allocation was for
MLX_OPERATIONS = ("::eval_gpu", "::eval_cpu", "sdpa_", "DnnGraph::", "CudaGraphExec::")


def frames(rec, depth: int) -> list:
    try:
        return list(rec.hybrid_stack_trace(max_stacks=depth))
    except Exception:  # a capture without native traces
        return list(rec.stack_trace(max_stacks=depth))


def native_caller(fs: list) -> str:
    for func, path, _ in fs:
        if not str(path).endswith(".py") and not str(func).startswith(ALLOCATOR_FRAMES):
            return str(func)[:150]
    return "?"


def python_caller(fs: list) -> str:
    for func, path, line in fs:
        if str(path).endswith(".py"):
            return f"{func} ({str(path).split('site-packages/')[-1]}:{line})"
    return "?"


def operation(fs: list) -> str:
    cuda = next((str(f).split("(")[0] for f, _, _ in fs if str(f).startswith("cu")), "")
    for func, _, _ in fs:
        name = str(func)
        if name.startswith("mlx::core::") and any(t in name for t in MLX_OPERATIONS):
            return f"{name.split('(')[0]} <- {cuda}"
    return f"? <- {cuda}"


def print_groups(title: str, recs: list, key: Callable[[list], str], stacks: dict, top: int) -> None:
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in recs:
        entry = by[key(stacks[id(r)])]
        entry[0] += r.size
        entry[1] += r.n_allocations
    print(f"\nby {title}:")
    for name, (size, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {size / 2**20:9.2f} MB {n:8d}  {name[:160]}")


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
    print_groups("first native caller", recs, native_caller, stacks, top)
    print_groups("first Python caller", recs, python_caller, stacks, top)
    print_groups("MLX operation <- CUDA or cuDNN call (none on CPU)", recs, operation, stacks, top)
    for r in sorted(recs, key=lambda r: -r.size)[:top]:
        print(f"\n{r.size / 2**20:.2f} MB in {r.n_allocations} ({AllocatorType(r.allocator).name})")
        for func, fpath, line in stacks[id(r)]:
            print(f"    {str(func)[:120]}  {str(fpath).split('/')[-1]}:{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
