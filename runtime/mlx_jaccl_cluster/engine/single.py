"""The lone sequence: one request decoded the way ``stream_generate`` does, not as a batch of one.

mlx-lm's ``BatchGenerator`` keeps every sequence in a ``BatchKVCache`` (array offsets and
left padding in every layer, every step) and prefills through ``PromptProcessingBatch``,
which adds a synchronisation and a ``GenerationBatch`` set-up before the first token. On a
GPU the step is bound by launching kernels, so a lone request paid for that machinery
with decode speed and time to first token (docs/BENCHMARKS.md, "Where the time goes").

``Lone`` runs one sequence with a plain ``KVCache`` and a ``generate_step``-like step
(the same double buffering: the next token's forward pass is queued before the current
token is read). When a second request arrives, ``to_generation_batch`` hands the sequence
to the ``BatchGenerator`` as a one-row ``GenerationBatch`` in exactly the state mlx-lm's
own batch would have after a step: the cache holds every token fed so far
(``BatchKVCache.merge``), the sampled-but-not-fed token is pending, and the token
context, stop matcher and token count carry over. So the sequence goes on from where it
was, and its tokens are the ones the batch engine would give.

A constrained sequence (structured output, a forced tool call) is masked by the
engine's ``GrammarBatch`` (``grammar.py``) for its uid, between the forward and the
sampling, the same call and the same order (mask, then logits processors) as in the batch
step. The row is keyed by uid and the uid survives the hand-over, so the matcher goes on
from where it was: the batch step then feeds it the pending token, as it would have.

The engine decides when to use it from the step's contents only (``core.py``), so every
rank takes the same path at the same step; the STEP frame says which, and followers check.

This module sets fields of mlx-lm's ``GenerationBatch`` and ``BatchGenerator`` that are
not public API (mlx-lm 0.32.2, pinned); ``tests/runtime/test_single.py`` runs the hand-over
on real ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, _merge_caches
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache

from .fastpath import needs_logprobs, needs_normalised
from .grammar import GrammarBatch

#: like ``generate_step``: give freed buffers back to MLX's allocator this often
_CLEAR_EVERY = 256


@dataclass
class Response:
    """What ``GenerationBatch.Response`` carries, for the engine's bookkeeping."""

    uid: int
    token: int
    logprobs: mx.array | None
    finish_reason: str | None
    prompt_cache: list[Any] | None
    all_tokens: list[int] | None


def can_join_batch(model) -> bool:
    """Whether every layer's cache of ``model`` can later join a batch (``merge``); a model
    whose caches cannot always takes the batch path."""
    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


class Lone:
    """One sequence, prefilled and decoded with a plain KV cache (see the module doc)."""

    def __init__(
        self,
        gen: BatchGenerator,
        uid: int,
        prompt: list[int],
        cache: list[Any],
        prefix: list[int],
        max_tokens: int,
        sampler,
        processors: list,
        masks: GrammarBatch | None = None,
    ):
        if not prompt:
            raise ValueError(f"sequence {uid} has an empty prompt")
        if max_tokens <= 0:
            raise ValueError(f"sequence {uid}'s max_tokens must be > 0")
        self.uid = uid
        self.model = gen.model
        self.stream = gen.stream
        self.cache = cache
        self.tokens = list(prefix)  # exactly the tokens the cache holds
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.processors = tuple(processors)
        self.masks = masks
        self.stop_sequences = gen._default_stop_sequences
        self.matcher = self.stop_sequences.matcher()
        self.fallback_sampler = gen.sampler
        self.count = 0  # tokens given out
        self._logprobs = needs_logprobs([sampler])
        self._normalise = self._logprobs or needs_normalised([sampler])
        with mx.stream(self.stream):
            # the prompt but its last token, in chunks as PromptProcessingBatch does (no
            # clear_cache between them: that only costs fresh allocations on the next chunk)
            step = gen.prefill_step_size
            for start in range(0, len(prompt) - 1, step):
                chunk = prompt[start : min(start + step, len(prompt) - 1)]
                self.model(mx.array(chunk)[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])
                self.tokens += chunk
            self.context = TokenBuffer(self.tokens) if self.processors else None
            self._pending = self._forward(mx.array(prompt[-1:]))
            self.tokens.append(prompt[-1])

    def _forward(self, inputs: mx.array) -> tuple[mx.array, mx.array | None]:
        """Feed ``inputs`` (one token, or the prompt's last) and queue the next sample."""
        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        if self.masks is not None:
            # the batch's own masking (a no-op for a uid without a grammar); its row keeps
            # the matcher across the hand-over, which keeps the uid
            logits = self.masks.apply([self.uid], inputs, logits)
        if self.processors:
            context = self.context.update_and_fetch(inputs)
            for processor in self.processors:
                logits = processor(context, logits)
        if self._normalise:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self.sampler(logits)
        logprobs = logits[0] if self._logprobs else None
        mx.async_eval(sampled, *([logprobs] if logprobs is not None else []))
        if self.masks is not None:
            self.masks.ahead([self.uid], sampled)  # the next mask, while this thread goes on
        return sampled, logprobs

    def step(self) -> Response:
        """Feed the pending token, queue the next one, and give the pending one out."""
        with mx.stream(self.stream):
            current, logprobs = self._pending
            self._pending = self._forward(current)
            token = current.item()  # after queueing the next step, as generate_step does
        self.tokens.append(token)
        self.count += 1
        finish = None
        if self.count >= self.max_tokens:
            finish = "length"
        if self.matcher.advance(token):
            finish = "stop"
        if self.count % _CLEAR_EVERY == 0:
            mx.clear_cache()
        done = finish is not None
        return Response(
            uid=self.uid,
            token=token,
            logprobs=logprobs,
            finish_reason=finish,
            prompt_cache=self.cache if done else None,
            all_tokens=self.tokens if done else None,
        )

    def to_generation_batch(self) -> GenerationBatch:
        """This sequence as a one-row ``GenerationBatch``, as if mlx-lm had run it so far."""
        with mx.stream(self.stream):
            batch = GenerationBatch.empty(self.model, self.fallback_sampler)
            batch.uids = [self.uid]
            batch.prompt_cache = _merge_caches([self.cache])
            batch.tokens = [self.tokens]
            batch.samplers = [self.sampler]
            batch.logits_processors = [self.processors]
            batch.stop_sequences = [self.stop_sequences]
            batch.max_tokens = [self.max_tokens]
            batch._current_tokens = None
            batch._current_logprobs = []
            batch._next_tokens, logprobs = self._pending
            batch._next_logprobs = [logprobs]
            batch._token_context = [self.context if self.context is not None else TokenBuffer(self.tokens)]
            batch._num_tokens = [self.count]
            batch._matchers = [self.matcher]
        return batch


def hand_over(gen: BatchGenerator, lone: Lone) -> None:
    """Make ``lone`` the first (only) row of ``gen``'s decode batch; ``gen`` must be idle."""
    if len(gen._generation_batch) or len(gen._prompt_batch) or gen._unprocessed_sequences:
        raise RuntimeError("a lone sequence can only join an idle BatchGenerator")
    gen._generation_batch = lone.to_generation_batch()


def take_uid(gen: BatchGenerator) -> int:
    """Give the next uid to a lone sequence, so the generator's later uids stay in step."""
    uid = gen._uid_count
    gen._uid_count += 1
    return uid
