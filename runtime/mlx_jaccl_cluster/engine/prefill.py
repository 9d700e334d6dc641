"""Prefill scheduled by a per-step token budget, chunks queued with the decode step, and the
batch cache's left padding on the host.

**The per-step token budget** (``Settings.step_token_budget``). mlx-lm's ``BatchGenerator``
interleaves a long prompt with decoding, but sizes each step's prefill by
``prefill_step_size`` *per waiting prompt*: eight waiting prompts make a step of eight
chunks, and the step's cost does not depend on how many sequences it also decodes. So
decoders among long prefills got steps several times slower than a decode step
(docs/BENCHMARKS.md, "Long prompts among decoders"). ``Budgeted`` is mlx-lm's generator
whose step runs the decode rows (the running sequences, and the prompts that start
decoding in that step) plus at most ``budget - decode rows`` prompt tokens, shared evenly
by the waiting prompts (padded to the longest chunk, as mlx-lm pads; every waiting prompt
advances by at least one token, so none starves when decoders fill the budget). The
split comes from the generator's own state, the same on every rank after the same STEP
frames, so every rank runs the same chunks; nothing travels for it. ``prefill_step_size``
keeps mlx-lm's other meaning: the largest piece one forward pass of a chunk runs (the
memory of a prefill's activations).

**Chunks queued, padding on the host.** What made those steps slow on a GPU was also
three waits for the GPU queue on the host:

- ``PromptProcessingBatch.prompt`` evaluates every chunk synchronously (``mx.eval`` of all
  cache states) and then empties MLX's buffer cache (``mx.clear_cache``), so the decode
  step queued just before drains the pipeline, and the next step allocates afresh;
- ``BatchKVCache.filter`` (a prompt moving to the decode batch, a sequence finishing)
  reads ``left_padding.tolist()``, an array read that waits for everything queued before;
- ``BatchKVCache.extract`` (a finished sequence's cache, kept for prefix reuse) does too.

Here each chunk is queued with ``mx.async_eval`` behind the decode step, as the decode
step queues its own next step, and the cache keeps a host copy of its left padding that
``filter`` and ``extract`` read instead of the array. MLX keeps freed buffers up to
``Settings.mlx_cache_limit``, which bounds what skipping ``clear_cache`` holds.

**The left padding array is rebuilt from the host copy** (a leaf, with no graph behind it)
whenever ``prepare``, ``finalize``, ``extend`` or ``filter`` changes it. mlx-lm's versions
update it lazily (``left_padding[indices] - k``, a concatenation) and evaluate it in the
next ``filter``'s ``tolist()``. A model builds its mask from one layer's cache only, so with
those reads gone the other layers' arrays were never evaluated: each of them kept every
update since the batch began as a graph, a few nodes for every sequence that joined or
left. On a CUDA rank that held about 230 KB of host memory a request while the batch never
emptied (docs/BENCHMARKS.md, "The growth found").

Results are unchanged: the same values, computed in the same order; only when the host
waits for them moves. Patched methods (and ``Budgeted._next``) are
mlx-lm 0.32.2's (pinned), each re-stated below with the change; ``install`` is idempotent
and every rank runs it.
"""

from __future__ import annotations

import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch, _right_pad_prompts
from mlx_lm.models.cache import BatchKVCache, KVCache

_orig_init = BatchKVCache.__init__
_orig_prepare = BatchKVCache.prepare
_orig_finalize = BatchKVCache.finalize
_orig_extend = BatchKVCache.extend


def _host_padding(cache: BatchKVCache) -> list[int]:
    """The host copy of ``cache.left_padding`` (read from the array only if a cache was
    built another way. A copy is found stale by its length alone: whoever sets ``state``
    directly on a cache with rows must drop ``_host_left_padding``; nothing here does)."""
    host = getattr(cache, "_host_left_padding", None)
    if host is None or len(host) != cache.left_padding.shape[0]:
        host = cache._host_left_padding = cache.left_padding.tolist()
    return host


def _set_padding(cache: BatchKVCache, host: list[int]) -> None:
    """Set the left padding, host copy and array, the array as a leaf (see the module doc)."""
    cache._host_left_padding = host
    cache.left_padding = mx.array(host, dtype=mx.int32)


def _init(self, left_padding):
    _orig_init(self, left_padding)
    self._host_left_padding = [int(p) for p in left_padding]
    self._host_right_padding = None


def _prepare(self, *, left_padding=None, lengths=None, right_padding=None):
    host = _host_padding(self)
    _orig_prepare(self, left_padding=left_padding, lengths=lengths, right_padding=right_padding)
    if left_padding is not None:
        _set_padding(self, [a + int(b) for a, b in zip(host, left_padding)])
    if right_padding is not None and max(right_padding) > 0:
        self._host_right_padding = [int(p) for p in right_padding]


def _finalize(self):
    host = None
    if self._right_padding is not None:
        right = getattr(self, "_host_right_padding", None)
        if right is None:
            right = self._right_padding.tolist()
        host = [a + b for a, b in zip(_host_padding(self), right)]
        self._host_right_padding = None
    _orig_finalize(self)
    if host is not None:
        _set_padding(self, host)


def _filter(self, batch_indices):
    # mlx-lm's filter, with the smallest left padding from the host copy
    host = _host_padding(self)
    if self.keys is not None:
        self.keys = self.keys[batch_indices]
        self.values = self.values[batch_indices]
    self.offset = self.offset[batch_indices]
    host = [host[i] for i in (batch_indices.tolist() if isinstance(batch_indices, mx.array) else batch_indices)]
    min_left_pad = min(host) if host else 0
    if min_left_pad > 0:
        if self.keys is not None:
            self.keys = self.keys[..., min_left_pad:, :]
            self.values = self.values[..., min_left_pad:, :]
        self._idx -= min_left_pad
        host = [p - min_left_pad for p in host]
    _set_padding(self, host)


def _extend(self, other):
    mine, theirs = _host_padding(self), _host_padding(other)
    if self.keys is None and other.keys is None:
        host = mine + theirs
    else:
        top = max(self._idx, other._idx)
        host = [p + top - self._idx for p in mine] + [p + top - other._idx for p in theirs]
    _orig_extend(self, other)
    _set_padding(self, host)


def _extract(self, idx):
    # mlx-lm's extract, with the row's left padding from the host copy
    cache = KVCache()
    padding = _host_padding(self)[idx]
    cache.keys = mx.contiguous(self.keys[idx : idx + 1, :, padding : self._idx])
    cache.values = mx.contiguous(self.values[idx : idx + 1, :, padding : self._idx])
    cache.offset = cache.keys.shape[2]
    return cache


def _prompt(self, tokens):
    # mlx-lm's PromptProcessingBatch.prompt, each chunk queued (async_eval), no clear_cache
    if len(self.uids) != len(tokens):
        raise ValueError("The batch length doesn't match the number of inputs")
    if not tokens:
        return
    for sti, ti in zip(self.tokens, tokens):
        sti += ti
    lengths = [len(p) for p in tokens]
    max_length = max(lengths)
    padding = [max_length - n for n in lengths]
    if max(padding) > 0:
        tokens = _right_pad_prompts(tokens, max_length=max_length)
        for c in self.prompt_cache:
            c.prepare(lengths=lengths, right_padding=padding)
    else:
        tokens = mx.array(tokens)
    while tokens.shape[1] > 0:
        n = min(self.prefill_step_size, tokens.shape[1])
        self.model(tokens[:, :n], cache=self.prompt_cache)
        mx.async_eval([c.state for c in self.prompt_cache])
        tokens = tokens[:, n:]
    if max(padding) > 0:
        for c in self.prompt_cache:
            c.finalize()
        mx.async_eval([c.state for c in self.prompt_cache])


class Budgeted(BatchGenerator):
    """mlx-lm's ``BatchGenerator`` whose steps keep to a token budget (see the module doc).

    ``last_step`` is what the latest ``next()`` ran: (decode rows, each waiting prompt's
    chunk), for tests and for anyone reading the schedule; the step runs decode rows +
    prompts x the longest chunk tokens (chunks are padded to the longest)."""

    def __init__(self, model, *, step_token_budget: int, **kwargs):
        super().__init__(model, **kwargs)
        if step_token_budget < 1:
            raise ValueError(f"step_token_budget must be at least 1, got {step_token_budget}")
        self.step_token_budget = step_token_budget
        self.last_step: tuple[int, tuple[int, ...]] = (0, ())

    def prefill_share(self, decode_rows: int, prompt_rows: int) -> int:
        """Prompt tokens each of ``prompt_rows`` waiting prompts gets in a step that also
        decodes ``decode_rows`` sequences (at least one, so no prompt starves)."""
        return max(1, (self.step_token_budget - decode_rows) // prompt_rows) if prompt_rows else 0

    def _next(self):
        # mlx-lm 0.32.2 BatchGenerator._next, with each prompt's chunk from the budget
        # instead of prefill_step_size per prompt
        generation_responses = []
        prompt_responses = []
        decode_rows = len(self._generation_batch)
        if decode_rows > 0:
            tic = time.perf_counter()
            generation_responses = self._generation_batch.next()
            self._counters.decode_time += time.perf_counter() - tic
            self._counters.generation_tokens += len(generation_responses)
            self._counters.generation_steps += 1
            if self._counters.generation_steps % 512 == 0:
                mx.clear_cache()

        if len(self._generation_batch) >= self.completion_batch_size:
            self.last_step = (decode_rows, ())
            return prompt_responses, generation_responses

        n = min(
            self.prefill_batch_size - len(self._prompt_batch),
            self.completion_batch_size - len(self._generation_batch),
            len(self._unprocessed_sequences),
        )
        if n > 0:
            self._prompt_batch.extend(self._make_batch(n))

        keep = []
        split = []
        for i, seq in enumerate(self._currently_processing):
            segments = seq[0]
            if len(segments) == 1 and len(segments[0]) == 1:
                split.append(i)
            else:
                keep.append(i)

        if split:
            last_inputs = [self._currently_processing[i][0][0] for i in split]
            progress = [(self._currently_processing[i][2],) * 2 for i in split]
            self._currently_processing = [self._currently_processing[i] for i in keep]
            # a GenerationBatch runs its first decode step as it is made: rows of this step
            gen_batch = self._prompt_batch.split(split).generate(last_inputs)
            decode_rows += len(gen_batch)
            for i, p in enumerate(progress):
                prompt_responses.append(PromptProcessingBatch.Response(gen_batch.uids[i], p, True, True))
            self._generation_batch.extend(gen_batch)

        share = self.prefill_share(decode_rows, len(self._currently_processing))
        prompts = []
        for i, seq in enumerate(self._currently_processing):
            response = PromptProcessingBatch.Response(self._prompt_batch.uids[i], 0, False, False)
            segments = seq[0]
            n = min(len(segments[0]), share)
            prompts.append(segments[0][:n])
            segments[0] = segments[0][n:]
            if len(segments[0]) == 0:
                segments.pop(0)
                response.end_of_segment = True
            seq[1] += len(prompts[-1])
            response.progress = (seq[1], seq[2])
            prompt_responses.append(response)

        self._counters.prompt_tokens += sum(len(p) for p in prompts)
        self.last_step = (decode_rows, tuple(len(p) for p in prompts))
        tic = time.perf_counter()
        self._prompt_batch.prompt(prompts)
        self._counters.prompt_time += time.perf_counter() - tic

        return prompt_responses, generation_responses


def install() -> None:
    """Patch ``BatchKVCache`` (host left padding) and ``PromptProcessingBatch.prompt``."""
    BatchKVCache.__init__ = _init
    BatchKVCache.prepare = _prepare
    BatchKVCache.finalize = _finalize
    BatchKVCache.filter = _filter
    BatchKVCache.extend = _extend
    BatchKVCache.extract = _extract
    PromptProcessingBatch.prompt = _prompt
