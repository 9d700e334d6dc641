"""Timed, checked collectives over an MLX group: the one place link figures come from.

Used by the link benchmark (``playbooks/bench.yml``, service stopped) and by the
running engine's idle-time link probe. Every rank of the group must call the same
function with the same arguments at the same point, as with any collective.

Each function returns one duration in seconds per iteration, measured around the
operation and its evaluation only; the result of every iteration is checked against
the value it must have (a bad link or a desynchronised rank gives wrong numbers, not
just slow ones) outside the timed region.
"""

from __future__ import annotations

import time

import mlx.core as mx

FLOAT_BYTES = 4


class CollectiveError(Exception):
    """A collective returned a wrong result."""


def _expected_sum(world: int) -> float:
    # rank r contributes r + 1
    return world * (world + 1) / 2


def _check(ok: mx.array, what: str) -> None:
    if not ok.item():
        raise CollectiveError(f"{what} returned a wrong result")


def _elements(nbytes: int) -> int:
    if nbytes < FLOAT_BYTES:
        raise ValueError(f"message size {nbytes} B is smaller than one float32")
    return nbytes // FLOAT_BYTES


def _timed(op, is_right, what: str, iters: int, warmup: int) -> list[float]:
    """Seconds per ``op()`` and its evaluation, ``iters`` samples after ``warmup``; each
    result checked with ``is_right`` outside the timed region."""
    samples = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        y = op()
        mx.eval(y)
        elapsed = time.perf_counter() - start
        _check(is_right(y), what)
        if i >= warmup:
            samples.append(elapsed)
    return samples


def all_sum_times(group: mx.distributed.Group, nbytes: int, iters: int, warmup: int = 2) -> list[float]:
    """Seconds per ``all_sum`` of ``nbytes`` of float32, ``iters`` samples after ``warmup``."""
    x = mx.full((_elements(nbytes),), float(group.rank() + 1), dtype=mx.float32)
    expected = _expected_sum(group.size())
    mx.eval(x)
    return _timed(
        lambda: mx.distributed.all_sum(x, group=group),
        lambda y: mx.all(y == expected),
        f"all_sum of {nbytes} B",
        iters,
        warmup,
    )


def all_sum_latency(group: mx.distributed.Group, iters: int, warmup: int = 5) -> list[float]:
    """Seconds per 1-element ``all_sum`` (the link's round-trip latency)."""
    return all_sum_times(group, FLOAT_BYTES, iters, warmup)


def all_gather_times(group: mx.distributed.Group, nbytes: int, iters: int, warmup: int = 2) -> list[float]:
    """Seconds per ``all_gather`` where every rank contributes ``nbytes``."""
    n = _elements(nbytes)
    x = mx.full((n,), float(group.rank() + 1), dtype=mx.float32)
    expected = mx.repeat(mx.arange(1, group.size() + 1, dtype=mx.float32), n)
    mx.eval(x, expected)
    return _timed(
        lambda: mx.distributed.all_gather(x, group=group),
        lambda y: mx.array_equal(y, expected),
        f"all_gather of {nbytes} B",
        iters,
        warmup,
    )


def send_recv_times(
    group: mx.distributed.Group, src: int, dst: int, nbytes: int, iters: int, warmup: int = 2
) -> list[float]:
    """Seconds per one-way transfer of ``nbytes`` from rank ``src`` to rank ``dst``.

    Only ``src`` and ``dst`` take part; other ranks return an empty list at once (the
    caller keeps every rank on the same sequence of pairs).
    """
    rank = group.rank()
    if rank not in (src, dst) or src == dst:
        return []
    n = _elements(nbytes)
    samples = []
    if rank == src:
        x = mx.full((n,), float(src + 1), dtype=mx.float32)
        mx.eval(x)
    for i in range(warmup + iters):
        start = time.perf_counter()
        if rank == src:
            mx.eval(mx.distributed.send(x, dst, group=group))
        else:
            y = mx.distributed.recv((n,), mx.float32, src, group=group)
            mx.eval(y)
        elapsed = time.perf_counter() - start
        if rank == dst:
            _check(mx.all(y == float(src + 1)), f"send/recv of {nbytes} B from rank {src}")
        if i >= warmup:
            samples.append(elapsed)
    return samples
