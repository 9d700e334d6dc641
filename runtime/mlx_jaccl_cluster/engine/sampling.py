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


def make_processors(params: SamplingParams, grammar_mask: GrammarMask | None = None) -> list:
    """Logit bias and penalties, then the grammar's mask (last, so that nothing can lift a
    token it forbids); an empty list when none were asked for."""
    processors = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    )
    if grammar_mask is not None:
        processors.append(grammar_mask)
    return processors


class GrammarMask:
    """A logits processor that lets through only the tokens an llguidance grammar allows.

    One per constrained sequence, on every rank: built from the same grammar text and fed
    the same sampled tokens, every rank's matcher computes the same mask, so the ranks
    keep picking the same token (the step checksum would catch a drift). mlx-lm calls it
    once per decode step with the sequence's tokens so far; the first call sees the
    prompt, each later one the token sampled since. When the grammar is complete only
    EOS is allowed, so the sequence stops there; if the matcher fails (it should not:
    every sampled token was allowed) it allows only EOS as well, and says so in the log.

    The mask is computed on the CPU (llguidance, about 50 µs at a 128k vocabulary) and
    applied with ``mx.where``, which runs on every MLX device (llguidance's own helper is
    a Metal kernel). Reading the sampled token costs one sync per step for constrained
    sequences only.
    """

    def __init__(self, lltokenizer, grammar: str, vocab_size: int, eos: list[int]):
        import llguidance

        self._matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        self._vocab = vocab_size
        self._eos = eos
        self._started = False
        self._failed = False
        if self._matcher.is_error():
            self._fail(self._matcher.get_error())

    def _fail(self, why: str) -> None:
        if not self._failed:
            import logging

            logging.getLogger("mjc.engine").warning("grammar matcher failed (%s); ending the sequence", why)
        self._failed = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import numpy as np

        if self._started and not self._failed:
            if not self._matcher.consume_token(int(tokens[-1].item())):
                self._fail(self._matcher.get_error())
        self._started = True
        width = logits.shape[-1]
        if self._failed:
            allowed = np.zeros(width, dtype=bool)
            allowed[[t for t in self._eos if t < width]] = True
        else:
            bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = np.zeros(width, dtype=bool)
            n = min(width, self._vocab, bits.size)
            allowed[:n] = bits[:n].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
