"""Per-request samplers and logits processors, built from mlx-lm's pieces.

Random draws are keyed by (request seed, draw number), not by MLX's global random
state, so every rank draws the same numbers for the same request, whatever else is in
the batch and however many ranks there are.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from ..generation import SamplingParams

Sampler = Callable[[mx.array], mx.array]

_KEY_MASK = (1 << 63) - 1


def make_sampler(params: SamplingParams) -> Sampler:
    """Greedy requests share one sampler (batched argmax); others get a keyed closure."""
    if params.greedy:
        return greedy_sampler
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0.0 < params.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        # A top_k at or above the vocabulary size keeps everything.
        filters.append(lambda x: apply_top_k(x, params.top_k) if params.top_k < x.shape[-1] else x)
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
