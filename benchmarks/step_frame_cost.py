#!/usr/bin/env python3
"""What one STEP frame costs a rank in CPU, and how long a blocked reader takes to wake.

The control channel sends one STEP frame before every generation step (cluster.py). This
measures, on loopback TCP with the runtime's own framing, sealing (``cluster.Seal``, as on
every authenticated connection) and ``Step`` encoding:

- rank 0's side: ``Step(...).to_wire()`` + ``send_frame`` (thread CPU time per frame);
- a follower's side: ``recv_frame`` + ``Step.from_wire`` of frames already sent;
- one frame there and back between two blocked readers (two wake-ups), p50 / p90 / p99.

Compare the first two with a step's CPU time (``gpu_bench.py tp`` reports CPU ms per
token): docs/benchmarks-cpu.md, "Issue 15, second pass". A measuring script: asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import threading
import time

from mlx_jaccl_cluster.cluster import STEP, Seal, _tune, recv_frame, send_frame
from mlx_jaccl_cluster.generation import Step


def thread_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--round-trips", type=int, default=2000)
    n = ap.parse_args()
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    _tune(a)
    _tune(b)
    secret, ln, fn = os.urandom(32), os.urandom(16), os.urandom(16)
    sa, sb = Seal(secret, b"leader", ln, fn), Seal(secret, b"follower", ln, fn)  # a: rank 0, b: a follower

    reader = threading.Thread(target=lambda: [recv_frame(b, seal=sb) for _ in range(n.frames)])
    reader.start()
    c0 = thread_cpu()
    for i in range(n.frames):
        send_frame(a, STEP, Step(i).to_wire(), seal=sa)
    sent = thread_cpu() - c0
    reader.join()
    print(f"rank 0, encode + send: {1e6 * sent / n.frames:.1f} us CPU per frame")

    frames = [Step(i).to_wire() for i in range(n.frames)]
    writer = threading.Thread(target=lambda: [send_frame(a, STEP, f, seal=sa) for f in frames])
    writer.start()
    writer.join()
    c0 = thread_cpu()
    for _ in range(n.frames):
        Step.from_wire(recv_frame(b, seal=sb)[1])
    print(f"follower, receive + decode: {1e6 * (thread_cpu() - c0) / n.frames:.1f} us CPU per frame")

    def echo() -> None:
        for _ in range(n.round_trips):
            _, payload = recv_frame(b, seal=sb)
            send_frame(b, STEP, payload, seal=sb)

    echoer = threading.Thread(target=echo)
    echoer.start()
    lat = []
    for i in range(n.round_trips):
        t0 = time.perf_counter()
        send_frame(a, STEP, Step(i).to_wire(), seal=sa)
        recv_frame(a, seal=sa)
        lat.append(time.perf_counter() - t0)
    echoer.join()
    lat.sort()
    q = lambda p: 1e6 * lat[min(len(lat) - 1, int(p * len(lat)))]
    print(f"there and back (two wake-ups): p50 {q(0.5):.0f} us, p90 {q(0.9):.0f} us, p99 {q(0.99):.0f} us")


if __name__ == "__main__":
    main()
