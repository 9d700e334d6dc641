"""Per-request samplers and logits processors, built from mlx-lm's pieces.

Random draws are keyed by (request seed, draw number), not by MLX's global random
state, so every rank draws the same numbers for the same request, whatever else is in
the batch and however many ranks there are.

A request's ``top_p``, ``min_p`` and ``top_k`` never reach ``mx.compile`` as Python
numbers. mlx-lm's filters are compiled functions, and ``mx.compile`` builds and keeps a
new kernel for every distinct constant it is called with, so a client sending varied
values stalled the engine thread on each new one and grew every rank without bound
(docs/BENCHMARKS.md has the cost). ``top_p`` goes to mlx-lm's filter as an array (one
kernel for all values). mlx-lm's min-p and top-k cannot take arrays (min-p checks its
value in Python, top-k's value is a position), so they are the same few ops here,
uncompiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, greedy_sampler, make_logits_processors

from ..generation import SamplingParams

Sampler = Callable[[mx.array], mx.array]

_KEY_MASK = (1 << 63) - 1


def min_p_filter(min_p: float) -> Callable[[mx.array], mx.array]:
    """Drop tokens less likely than ``min_p`` times the likeliest (which always stays)."""
    log_min_p = math.log(min_p)

    def apply(logprobs: mx.array) -> mx.array:
        floor = mx.max(logprobs, axis=-1, keepdims=True) + log_min_p
        return mx.where(logprobs < floor, -mx.inf, logprobs)

    return apply


def top_k_filter(top_k: int) -> Callable[[mx.array], mx.array]:
    """Keep the ``top_k`` likeliest tokens (all of them when ``top_k`` reaches the vocabulary)."""

    def apply(logprobs: mx.array) -> mx.array:
        if top_k >= logprobs.shape[-1]:
            return logprobs
        dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
        return mx.put_along_axis(logprobs, dropped, mx.array(-mx.inf, logprobs.dtype), axis=-1)

    return apply


def top_p_filter(top_p: float) -> Callable[[mx.array], mx.array]:
    """Keep the smallest set of likeliest tokens whose mass reaches ``top_p`` (mlx-lm's)."""
    threshold = mx.array(top_p, mx.float32)
    return lambda logprobs: apply_top_p(logprobs, threshold)


def make_sampler(params: SamplingParams) -> Sampler:
    """Greedy requests share one sampler (batched argmax); others get a keyed closure."""
    if params.greedy:
        return greedy_sampler
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0.0 < params.top_p < 1.0:
        filters.append(top_p_filter(params.top_p))
    if params.min_p > 0.0:
        filters.append(min_p_filter(params.min_p))
    if params.top_k > 0:
        filters.append(top_k_filter(params.top_k))
    inv_temp = 1.0 / params.temperature
    draws = 0

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal draws
        for f in filters:
            logprobs = f(logprobs)
        key = mx.random.key((params.seed * 1_000_003 + draws) & _KEY_MASK)
        draws += 1
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return sampler


def make_processors(params: SamplingParams) -> list:
    """Logit bias and penalties; an empty list when none were asked for. (A grammar's mask
    is no processor: engine/grammar.py masks the whole batch before these run, and none of
    them can lift a -inf.)"""
    return make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
