"""Grammar masks for the whole batch at once, filled while the model's forward runs.

Each constrained sequence has one llguidance matcher, built from the grammar text in its
request (the same text on every rank). The mask of step n+1 needs the token sampled at
step n, and the token of step n+1 needs that mask, so the chain per token is: token n
known -> feed it, fill the mask -> sample n+1. Two threads share the work:

- **the mask thread** (``mjc-mask``, :meth:`GrammarBatch.ahead`): as soon as a step has
  queued its sampling, it waits for those tokens (without the GIL), feeds each
  constrained row's matcher its token and fills the row's next mask, while the engine
  thread delivers the step's tokens, takes new requests and builds and queues the next
  forward (Python work that, on a GPU, bounds the step);
- **the engine thread**, once per decode step, between the forward and the sampling
  (:meth:`GrammarBatch.apply`): starts the forward (``mx.async_eval`` of the logits),
  joins the mask thread's job, fills in the step any row the mask thread did not see (a
  new row: its first mask; the prompt's last token is not fed), and masks the whole
  batch's logits with one expression (the bitmask goes to the device packed, 32 tokens a
  word, and is unpacked there): a forbidden token's logit is -inf.

The mask thread never touches an array the engine thread uses: it waits on a copy of the
sampled tokens queued for it (``sampled + 0``), and rows are only read after its job is
joined. A row that has finished (its matcher stopped) is not fed again: EOS only.

Rows without a grammar get an all-ones row, so a mixed batch is masked by the same one
expression; a batch with no constrained row is left alone and costs nothing.

Matcher by matcher, not with llguidance's parallel batch calls (``LLExecutor``'s
``consume_token_par``, ``fill_next_token_bitmask_par``): they release the GIL, and
getting it back waits for whichever thread took it meanwhile, up to Python's 5 ms switch
interval when that thread is busy (the HTTP thread, streaming). Measured with a busy Python thread alongside, eight
rows: 6-7 ms per parallel call against 70 µs (feeding) and 160 µs (filling) one matcher
after another, which keeps the GIL; alone, both take about 100 µs. On a GPU the parallel
version measured 0.84 (1 client) and 0.80 (8 clients) of unconstrained decoding
(docs/BENCHMARKS.md).

mlx-lm calls logits processors row by row (a slice, the processor, a concatenate) and a
processor sees only its own row, so a batched mask cannot be one of them. :func:`install`
wraps ``GenerationBatch._step`` instead: while a batch with constrained rows steps, its
model call is followed by :meth:`GrammarBatch.apply`, and the step by
:meth:`GrammarBatch.ahead`. The single-sequence path (``single.py``) calls both itself,
around its sampling; rows are keyed by uid, so a sequence keeps its row (matcher, mask
filled ahead) when it moves from there into the batch.

Lockstep: every rank builds the same matchers and feeds them the same tokens, so every
rank computes the same masks and samples the same token; which thread fills a mask, and
when, changes nothing, since a mask depends on the tokens already chosen only. Nothing is
broadcast (the step checksum still catches a drift, as for any other cause).
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
    """One constrained sequence: its matcher (being built, then built), whether it has
    seen its first step (whose input is the prompt's last token, not a sampled one), why
    its matcher gave up (None while it follows), and the next step's mask when the mask
    thread has filled it ahead (its token already fed)."""

    __slots__ = ("building", "matcher", "started", "why", "next_mask", "ahead")

    def __init__(self, building: Future, words: int):
        self.building: Future | None = building
        self.matcher = None
        self.started = False
        self.why: str | None = None
        self.next_mask = np.empty(words, dtype=np.int32)
        self.ahead = False


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
        # Feeds each row the token just sampled for it and fills its next mask, while the
        # engine thread goes on (see ahead()); one job at a time, joined before any read.
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mjc-mask")
        self._job: Future | None = None
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
        self._rows[uid] = _Row(self._builder.submit(self._build, grammar), self._words)

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
        if not self._rows:  # the last constrained row left: its mask job ends here, and so
            self._join()  # does any error of it (not on the next constrained request)

    def __len__(self) -> int:
        return len(self._rows)

    def failure(self, uid: int) -> str | None:
        """Why ``uid``'s matcher gave up (its sequence was then only let end), or None.
        Read when the sequence ends, before :meth:`discard`; it waits for the mask thread,
        which may be feeding the row its last token."""
        row = self._rows.get(uid)
        if row is None:
            return None
        self._join()
        return row.why

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)
        self._filler.shutdown(wait=False, cancel_futures=True)

    # --- the step -----------------------------------------------------------------
    def apply(self, uids: list[int], inputs: mx.array, logits: mx.array) -> mx.array:
        """``logits`` (one row per uid, vocabulary last) with every token the grammars
        forbid at -inf. ``inputs`` holds each row's previous token (the forward's input)."""
        rows = [self._rows.get(uid) for uid in uids]
        if not any(rows):
            return logits
        mx.async_eval(logits)  # the forward runs while the masks are filled
        self._join()
        tokens = None
        n = len(uids)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.full((n, self._words), -1, dtype=np.int32)
        bitmask = self._bitmask[:n]
        bitmask.fill(-1)
        row_bytes = self._words * 4
        for i, row in enumerate(rows):
            if row is None:
                continue
            if row.ahead:  # filled by the mask thread while the engine thread went on
                bitmask[i] = row.next_mask
                row.ahead = False
                continue
            if tokens is None:  # a new row, or one the mask thread did not see
                tokens = inputs.reshape(-1).tolist()
            self._feed(row, tokens[i])
            if row.why is not None:
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

    def _feed(self, row: _Row, token: int) -> None:
        """Feed ``row`` its previous token (none at its first step) and settle its matcher."""
        if row.building is not None:
            self._settle(row)
        if row.why is None:
            if row.started and not row.matcher.consume_token(token):
                self._fail(row, row.matcher.get_error() or f"token {token} refused")
            row.started = True

    def ahead(self, uids: list[int], sampled: mx.array) -> None:
        """Start the next step's masks now: ``sampled`` (queued, not yet computed) holds the
        token each row of ``uids`` will feed its next forward. The mask thread waits for it,
        feeds each constrained row's matcher and fills its next mask, while the engine
        thread delivers this step's tokens and builds and queues the next forward; the next
        :meth:`apply` joins it. The masks depend on the chosen tokens only, so every rank
        computes the same ones, whichever thread and whenever."""
        rows = [self._rows.get(uid) for uid in uids]
        if not any(row is not None and row.started for row in rows):
            return
        self._join()
        # The mask thread waits on an array of its own: the engine thread goes on using
        # ``sampled`` (the next forward's input) and MLX arrays are not shared across
        # threads safely; this one only the mask thread reads.
        copy = sampled.reshape(-1) + 0
        mx.async_eval(copy)
        self._job = self._filler.submit(self._fill_ahead, rows, copy)

    def _fill_ahead(self, rows: list[_Row | None], sampled: mx.array) -> None:
        tokens = sampled.tolist()  # waits for the device, without the GIL
        row_bytes = self._words * 4
        for row, token in zip(rows, tokens):
            if row is None or not row.started:
                continue
            if row.why is None and row.matcher.is_stopped():
                # finished: the engine drops it after this step; EOS only if it steps again
                row.next_mask[:] = self._eos_row
            else:
                self._feed(row, token)
                if row.why is not None:
                    row.next_mask[:] = self._eos_row
                else:
                    row.matcher.unsafe_compute_mask_ptr(row.next_mask.ctypes.data, row_bytes)
            row.ahead = True

    def _join(self) -> None:
        """Wait for the mask thread's job (rows are only read after it)."""
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

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
        # Rank 0 validated the grammar and every sampled token was allowed, but a grammar
        # may still outgrow llguidance's parser limits part-way (a schema with hundreds of
        # optional properties does after its "{"). The sequence then may only end, the same
        # way on every rank; rank 0 ends the request with an error naming the reason.
        if row.why is None:
            row.why = short_error(why)
            log.warning("grammar matcher gave up (%s); ending the sequence", row.why)

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


def short_error(message: str) -> str:
    """llguidance's error without the parser state and grammar it appends."""
    first = message.strip().split("\n", 1)[0].strip()
    return first[:300] or "the matcher gave up"


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
        out = _original_step(self)
    finally:
        self.model = model
    grammar.ahead(uids, self._next_tokens)
    return out
