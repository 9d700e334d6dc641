"""Can MLX's nccl backend move one array from rank 0 to rank 1 (what a pipeline stage
does)? Two processes, one GPU each: send / recv_like on the default (GPU) stream and on the
CPU stream, and an all_gather for comparison. Prints each rank's outcome.

    PYTHONPATH=/tmp/mjc-site:runtime python3 benchmarks/device/nccl_p2p_probe.py   (after run.sh stash + an install)

On MLX 0.32.4 (2 H200s, 2026-11-30): "Send has no CUDA implementation" on the GPU stream,
"[nccl] Send not supported in NCCL backend" on the CPU stream; all_gather works
(docs/BENCHMARKS.md, "Pipeline on two GPUs").
"""

from __future__ import annotations

import os
import subprocess
import sys

RANK = r"""
import mlx.core as mx
g = mx.distributed.init(backend="nccl")
r = g.rank()
x = mx.arange(8, dtype=mx.float32) * (r + 1)
out = {}
for name, stream in (("send/recv, GPU stream", None), ("send/recv, CPU stream", mx.cpu)):
    try:
        y = mx.distributed.send(x, 1, group=g, stream=stream) if r == 0 else mx.distributed.recv_like(
            x, 0, group=g, stream=stream
        )
        mx.eval(y)
        out[name] = y.tolist()
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
try:
    a = mx.distributed.all_gather(x, group=g)
    mx.eval(a)
    out["all_gather, GPU stream"] = a.tolist()
except Exception as e:
    out["all_gather, GPU stream"] = f"{type(e).__name__}: {e}"
print(r, out, flush=True)
"""


def main() -> int:
    from mlx_jaccl_cluster.launch import free_ports

    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env |= {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port), "MLX_WORLD_SIZE": "2", "NCCL_NVLS_ENABLE": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env=env | {"MLX_RANK": str(r), "CUDA_VISIBLE_DEVICES": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        try:
            print(p.communicate(timeout=60)[0][-1500:])
        except subprocess.TimeoutExpired:
            p.kill()
            print("timed out:", p.communicate()[0][-1500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
