"""Grammar masks for the whole batch at once, filled while the model's forward runs.

Each constrained sequence has one llguidance matcher, built from the grammar text in its
request (the same text on every rank). Once per decode step, between the forward and the
sampling, :meth:`GrammarBatch.apply`:

1. starts the forward (``mx.async_eval`` of the logits): the device works on it while the
   CPU does the rest;
2. reads the tokens sampled at the previous step, the forward's own input (mlx-lm reads
   them at the end of the same step anyway, so this adds no wait of its own);
3. feeds each matcher its token and fills every row's mask straight into one
   preallocated bitmask, holding the GIL (see below);
4. masks the whole batch's logits with one expression (the bitmask goes to the device
   packed, 32 tokens a word, and is unpacked there): a forbidden token's logit is -inf.

Rows without a grammar get an all-ones row, so a mixed batch is masked by the same one
expression; a batch with no constrained row is left alone and costs nothing.

Why not llguidance's parallel batch calls (``LLExecutor.consume_token_par``,
``fill_next_token_bitmask_par``): they release the GIL, and getting it back waits for
whichever thread took it meanwhile, up to Python's 5 ms switch interval when that thread
is busy (the HTTP thread, streaming). Measured with a busy Python thread alongside, eight
rows: 6-7 ms per parallel call against 70 µs (feeding) and 160 µs (filling) one matcher
after another, which keeps the GIL; alone, both take about 100 µs. On a GPU the parallel
version measured 0.84 (1 client) and 0.80 (8 clients) of unconstrained decoding
(docs/BENCHMARKS.md).

mlx-lm calls logits processors row by row (a slice, the processor, a concatenate) and a
processor sees only its own row, so a batched mask cannot be one of them. :func:`install`
wraps ``GenerationBatch._step`` instead: while a batch with constrained rows steps, its
model call is followed by :meth:`GrammarBatch.apply`. A step loop of our own calls
``apply`` itself between its forward and its sampling.

Lockstep: every rank builds the same matchers and feeds them the same tokens, so every
rank computes the same masks and samples the same token; nothing is broadcast (the step
checksum still catches a drift, as for any other cause).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import numpy as np

log = logging.getLogger("mjc.engine")

#: Compiled grammars kept for reuse (a pristine matcher each; a new sequence with the same
#: grammar gets a copy in microseconds instead of a compile in milliseconds to seconds).
#: Clients tend to send the same schema over and over.
COMPILED_KEPT = 32


class _Row:
    """One constrained sequence: its matcher (being built, then built) and whether it has
    seen its first step (whose input is the prompt's last token, not a sampled one)."""

    __slots__ = ("building", "matcher", "started", "failed")

    def __init__(self, building: Future):
        self.building: Future | None = building
        self.matcher = None
        self.started = False
        self.failed = False


class GrammarBatch:
    """The grammar matchers of the engine's constrained sequences, keyed by uid.

    ``vocab_size`` is llguidance's vocabulary (the mask's width in bits); ``eos`` the
    tokens a finished or failed sequence may still sample.
    """

    def __init__(self, lltokenizer, vocab_size: int, eos: list[int], rows: int = 8):
        import llguidance

        self._llguidance = llguidance
        self._tokenizer = lltokenizer
        self._vocab = vocab_size
        self._words = (vocab_size + 31) // 32
        # LLMatcher's constructor compiles the grammar (milliseconds, more for a large
        # one) without the GIL: done here, it overlaps the sequence's prefill instead of
        # stalling every other sequence's decoding. Only this thread touches _compiled.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mjc-grammar")
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._rows: dict[int, _Row] = {}
        self._bitmask = np.full((max(rows, 1), self._words), -1, dtype=np.int32)
        eos_row = np.zeros(self._words, dtype=np.uint32)
        for t in eos:
            if t < vocab_size:
                eos_row[t // 32] |= np.uint32(1 << (t % 32))
        self._eos_row = eos_row.view(np.int32)
        self._unpack: dict[int, tuple[mx.array, mx.array]] = {}

    # --- membership (the engine thread) -------------------------------------------
    def add(self, uid: int, grammar: str) -> None:
        """Start building ``uid``'s matcher; it is needed at its first decode step."""
        self._rows[uid] = _Row(self._builder.submit(self._build, grammar))

    def _build(self, grammar: str):
        pristine = self._compiled.get(grammar)
        if pristine is None:
            pristine = self._llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if pristine.is_error():
                return pristine
            self._compiled[grammar] = pristine
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return pristine.deep_copy()

    def discard(self, uids) -> None:
        for uid in uids:
            self._rows.pop(uid, None)

    def __len__(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)

    # --- the step -----------------------------------------------------------------
    def apply(self, uids: list[int], inputs: mx.array, logits: mx.array) -> mx.array:
        """``logits`` (one row per uid, vocabulary last) with every token the grammars
        forbid at -inf. ``inputs`` holds each row's previous token (the forward's input)."""
        rows = [self._rows.get(uid) for uid in uids]
        if not any(rows):
            return logits
        mx.async_eval(logits)  # the forward runs while the masks are filled
        tokens = inputs.reshape(-1).tolist()
        n = len(uids)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.full((n, self._words), -1, dtype=np.int32)
        bitmask = self._bitmask[:n]
        bitmask.fill(-1)
        row_bytes = self._words * 4
        for i, row in enumerate(rows):
            if row is None:
                continue
            if row.building is not None:
                self._settle(row)
            if not row.failed:
                if row.started and not row.matcher.consume_token(tokens[i]):
                    self._fail(row, f"token {tokens[i]} refused: {row.matcher.get_error()}")
                row.started = True
            if row.failed:
                bitmask[i] = self._eos_row
            else:
                row.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data + i * row_bytes, row_bytes)
        words = bitmask.view(np.uint32)
        if logits.shape[-1] > self._vocab:
            # Logits past the tokenizer's vocabulary (a model may pad its head): one more
            # word, forbidding them in constrained rows only.
            past = np.array([0 if row is not None else 0xFFFFFFFF for row in rows], dtype=np.uint32)
            words = np.concatenate([words, past[:, None]], axis=1)
        return self._masked(logits, mx.array(words))

    def _settle(self, row: _Row) -> None:
        try:
            row.matcher = row.building.result()
        except Exception as exc:  # the pool was shut down, or llguidance raised
            row.building = None
            self._fail(row, f"{type(exc).__name__}: {exc}")
            return
        row.building = None
        if row.matcher.is_error():
            self._fail(row, row.matcher.get_error())

    def _fail(self, row: _Row, why: str) -> None:
        # It should not happen (rank 0 validated the grammar and every sampled token was
        # allowed); the sequence then may only end, the same way on every rank.
        if not row.failed:
            log.warning("grammar matcher failed (%s); ending the sequence", why)
        row.failed = True

    def _masked(self, logits: mx.array, words: mx.array) -> mx.array:
        width = logits.shape[-1]
        if width not in self._unpack:
            index = np.arange(width)
            word = np.where(index < self._vocab, index // 32, self._words)
            self._unpack[width] = (mx.array(word.astype(np.uint32)), mx.array((index % 32).astype(np.uint32)))
        word, shift = self._unpack[width]
        bits = mx.take(words, word, axis=1)
        allowed = ((bits >> shift) & 1).astype(mx.bool_)
        if logits.ndim == 3:
            allowed = allowed[:, None, :]
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


_active: GrammarBatch | None = None
_original_step = None


def install(grammar: GrammarBatch | None) -> None:
    """Mask the constrained rows of mlx-lm's generation batches with ``grammar``
    (idempotent; every rank must do the same). ``None`` turns it off."""
    global _active, _original_step
    from mlx_lm.generate import GenerationBatch

    _active = grammar
    if GenerationBatch._step is not _step:  # wrap whatever step is there now (fastpath's)
        _original_step = GenerationBatch._step
        GenerationBatch._step = _step


def _step(self):
    grammar = _active
    if grammar is None or not len(grammar) or not any(uid in grammar._rows for uid in self.uids):
        return _original_step(self)
    model = self.model
    uids = self.uids

    def masked_model(inputs, cache=None):
        return grammar.apply(uids, inputs, model(inputs, cache=cache))

    self.model = masked_model
    try:
        return _original_step(self)
    finally:
        self.model = model
