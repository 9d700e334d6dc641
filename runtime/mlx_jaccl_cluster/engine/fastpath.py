"""Two changes to mlx-lm's batch engine, each for the common case and each result-neutral.

**Batch of one: no attention mask.** ``BatchGenerator`` keeps every sequence in a ``BatchKVCache``, whose attention mask is an
array (causal and left padding) on every step, also when the batch holds one sequence
and one new token, where that mask is all true. An array mask keeps MLX's attention on
its general path; with no mask it takes the single-query kernel, as ``stream_generate``
does. A batch of one never holds left padding (a prompt is padded to the longest of its
batch, and ``filter`` drops the padding all remaining rows share), so dropping the mask
there changes no result.

**No log-probabilities nobody asked for.** ``GenerationBatch._step`` normalises every
row's logits (``logsumexp``) and splits the result into one array per row on every
step, kernels that the GPU step, bound by launching them, pays for whether or not a
request asked for logprobs. ``_step`` below is mlx-lm 0.32.2's, except that the split
happens only when a row's sampler is a ``WithLogprobs`` (the engine wraps the sampler of
a request that asked), and the normalisation only then or when a sampler needs it: all
samplers here are shift-invariant (argmax, top-k, min-p, top-p on its own total mass,
categorical), but seeded sampling keeps normalised input so that its draws stay those
of in-process ``stream_generate``; greedy decoding skips it. Rows without logprobs carry
None where mlx-lm carries an array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import greedy_sampler

_original_make_mask = BatchKVCache.make_mask


def _make_mask(self, N: int, return_array: bool = False, **kwargs):
    if (
        N == 1
        and not return_array
        and kwargs.get("window_size") is None
        and self.keys is not None
        and self.keys.shape[0] == 1
    ):
        return None
    return _original_make_mask(self, N, return_array=return_array, **kwargs)


class WithLogprobs:
    """The sampler of a request that asked for logprobs: marks its row (see the module doc)."""

    def __init__(self, sampler: Callable[[mx.array], mx.array]):
        self.sampler = sampler

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self.sampler(logprobs)


def needs_logprobs(samplers: Sequence) -> bool:
    return any(isinstance(s, WithLogprobs) for s in samplers)


def needs_normalised(samplers: Sequence) -> bool:
    """Whether the samplers must see log-probabilities, not raw logits (all but greedy)."""
    return any((s.sampler if isinstance(s, WithLogprobs) else s) is not greedy_sampler for s in samplers)


def _step(self):
    # mlx-lm 0.32.2 GenerationBatch._step, with the log-probabilities only where needed
    self._current_tokens = self._next_tokens
    self._current_logprobs = self._next_logprobs
    inputs = self._current_tokens

    logits = self.model(inputs[:, None], cache=self.prompt_cache)
    logits = logits[:, -1, :]

    token_context = []
    if any(self.logits_processors):
        processed_logits = []
        for e in range(len(self.uids)):
            sample_logits = logits[e : e + 1]
            processors = self.logits_processors[e] or ()
            if processors:
                context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                token_context.append(context)
                for processor in processors:
                    sample_logits = processor(context, sample_logits)
            processed_logits.append(sample_logits)
        logits = mx.concatenate(processed_logits, axis=0)

    samplers = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * len(self.uids))]
    wanted = needs_logprobs(samplers)
    if wanted or needs_normalised(samplers):
        logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    if not samplers or all(s is samplers[0] for s in samplers):
        sampled = (samplers[0] if samplers else self.fallback_sampler)(logits)
    else:
        sampled = mx.concatenate([s(logits[e : e + 1]) for e, s in enumerate(samplers)], axis=0)

    self._next_tokens = sampled
    self._next_logprobs = list(logits) if wanted else [None] * len(self.uids)
    mx.async_eval(self._next_tokens, [x for x in self._next_logprobs if x is not None], token_context)

    mx.eval(inputs, [x for x in self._current_logprobs if x is not None])
    inputs = inputs.tolist()
    for sti, ti in zip(self.tokens, inputs):
        sti.append(ti)
    return inputs, self._current_logprobs


def install() -> None:
    """Patch ``BatchKVCache.make_mask`` and ``GenerationBatch._step`` (idempotent; every
    rank must do the same)."""
    BatchKVCache.make_mask = _make_mask
    GenerationBatch._step = _step
