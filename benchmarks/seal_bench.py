#!/usr/bin/env python3
"""What sealing a STEP frame costs, against what the frame already costs.

Every control frame after the handshake carries a sequence number and a 16-byte
HMAC-SHA256 tag (``cluster.Seal``); rank 0 seals each STEP frame and every follower opens
it (checks tag and sequence) before each generation step. This times, for STEP frames of
typical shapes, one seal plus one open against one ``Step.to_wire`` plus one
``Step.from_wire`` (the JSON encode on rank 0 and decode on a follower that every frame
already pays), in the same process, interleaved round by round so that a busy machine
slows both alike. Each figure is the best round and the median round of ``--rounds``
rounds of ``--number`` operations each (the best is the cost, as ``timeit`` advises; the
median shows how far a shared machine moved it); the ratio is of the best rounds.

    .venv/bin/python benchmarks/seal_bench.py [--rounds 15] [--number 0 (auto)]

(docs/runtime.md, "Security and limits", records a run.) A measuring script, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from mlx_jaccl_cluster.cluster import _HEADER, STEP, Seal, encode_frame
from mlx_jaccl_cluster.generation import GenerationRequest, SamplingParams, Step


def shapes() -> dict[str, Step]:
    """STEP frames as the engine sends them: most steps carry nothing but the checksum."""

    def request(n: int) -> GenerationRequest:
        return GenerationRequest(
            prompt_tokens=[(i * 7919) % 49152 for i in range(n)],
            max_tokens=256,
            sampling=SamplingParams(temperature=0.7, top_p=0.9),
        )

    return {
        "decode step (checksum only)": Step(checksum=1234567890123),
        "a request ends": Step(checksum=1234567890123, removes=(17,)),
        "insert 1 x 32 tokens": Step(checksum=12345, inserts=(request(32),), reused=(0,)),
        "insert 1 x 2,048 tokens": Step(checksum=12345, inserts=(request(2048),), reused=(0,)),
        "insert 1 x 32,768 tokens": Step(checksum=12345, inserts=(request(32768),), reused=(0,)),
        "insert 8 x 4,096 tokens": Step(
            checksum=12345, inserts=tuple(request(4096) for _ in range(8)), reused=(0,) * 8
        ),
    }


def per_op_us(fn, number: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - started) / number / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=0, help="operations per round (0: about 20 ms of JSON)")
    opts = parser.parse_args()
    ln, fn = os.urandom(32), os.urandom(32)
    secret = b"benchmark-secret-0123456789abcdef"
    print(f"{'STEP frame':28} {'bytes':>8} {'json enc+dec us':>18} {'seal+open us':>15} {'seal/json':>9}")
    print(f"{'':28} {'':>8} {'best / median':>18} {'best / median':>15}")
    for name, step in shapes().items():
        payload = step.to_wire()
        sender, receiver = Seal(secret, b"leader", ln, fn), Seal(secret, b"follower", ln, fn)

        def json_round_trip(step=step) -> None:
            Step.from_wire(step.to_wire())

        def seal_round_trip(payload=payload, sender=sender, receiver=receiver) -> None:
            raw = encode_frame(STEP, payload, sender)
            assert receiver.open(raw[: _HEADER.size], raw[_HEADER.size :]) is not None

        number = opts.number or max(1, int(20_000 / max(per_op_us(json_round_trip, 3), 0.1)))
        json_us, seal_us = [], []
        for _ in range(opts.rounds):
            json_us.append(per_op_us(json_round_trip, number))
            seal_us.append(per_op_us(seal_round_trip, number))
        j, s = min(json_us), min(seal_us)
        jm, sm = statistics.median(json_us), statistics.median(seal_us)
        print(f"{name:28} {len(payload):>8,} {j:>8.1f} / {jm:>7.1f} {s:>6.1f} / {sm:>6.1f} {s / j:>9.2f}")


if __name__ == "__main__":
    main()
