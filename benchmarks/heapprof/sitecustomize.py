"""memray's view of a live rank: put this folder first on the rank's ``PYTHONPATH``, memray
on it too, and set ``MEMPROF_OUT=PREFIX``. Then SIGUSR1 starts tracking every allocation,
Python's and native (with both stacks), into ``PREFIX.PID.bin``, and SIGUSR2 stops it; what
the window allocated and the rank still held at its end is what
``benchmarks/heap_leaks.py PREFIX.PID.bin`` prints. For measuring, never for serving
(benchmarks/device/rank_memory.sh uses it; memray is no dependency of the project).
"""

import os
import signal
import sys

_PREFIX = os.environ.get("MEMPROF_OUT")


def _install() -> None:
    try:
        import memray
    except ImportError as exc:  # keep SIGUSR1/2 from ending the process: say why instead
        why = str(exc)

        def _missing(signum, frame):
            print(f"heapprof: memray is not importable ({why})", file=sys.stderr, flush=True)

        signal.signal(signal.SIGUSR1, _missing)
        signal.signal(signal.SIGUSR2, _missing)
        return

    tracking: list = []

    def start(signum, frame):
        if tracking:
            return
        path = f"{_PREFIX}.{os.getpid()}.bin"
        if os.path.exists(path):
            os.remove(path)
        tracker = memray.Tracker(path, native_traces=True, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS)
        tracker.__enter__()
        tracking.append(tracker)

    def stop(signum, frame):
        if tracking:
            tracking.pop().__exit__(None, None, None)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if _PREFIX:
    _install()
