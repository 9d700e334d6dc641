"""Prefix caching: a later prompt that starts like an earlier one (a chat's next turn, a
shared system prompt) reuses that prompt's KV cache instead of computing it again.

mlx-lm's ``LRUPromptCache`` does the bookkeeping (a token trie, nearest match, trimming a
longer entry, LRU eviction). Every rank keeps its own, holding its own shard of each KV
cache, and applies the same fetches and stores in the same order, so the caches agree
across ranks. They must: a rank that reused fewer tokens would run a different number of
forward passes and the group's collectives would no longer pair up. So rank 0 sends the
number of reused tokens with each insert and the other ranks check theirs against it
(engine/core.py). Eviction must be decided identically too, so it never looks at a rank's
own bytes (pipeline stages hold different numbers of layers, tensor shards may round
differently): entries are bounded by count (mlx-lm's own LRU) and by a byte figure every
rank computes alike, tokens held x ``kv_bytes_per_token`` of the whole model (from its
config). Each rank's real share is about that figure / world size.

An entry must own only its own bytes: ``BatchGenerator`` hands a finished sequence's cache
out as a *lazy* copy of a slice of the whole batch's KV buffers (every sequence of the
batch, grown in 256-token steps). Kept unevaluated, each entry pinned the batch buffers it
was cut from, so 8 entries held up to 8 old batches (SmolLM2 here: 8 sequences x 256
tokens x 46 KB = 94 MB each) while the byte figure said a few MB; rank 0 went from 275 to
778 MB in a 6-minute soak of ordinary chats. ``store`` evaluates the copy first.
"""

from __future__ import annotations

import weakref
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_KEY = "model"  # one model per process
_DTYPE_BYTES = {"float32": 4, "float64": 8}  # anything else (bfloat16, float16) is 2
_LIVE: weakref.WeakSet[PromptCache] = weakref.WeakSet()


def held_bytes() -> int:
    """Bytes of KV this process's prompt caches hold (its own shard; the heartbeat's
    ``prompt_cache`` figure). Read from another thread: a stale figure is harmless."""
    return sum(c.nbytes for c in list(_LIVE))


def kv_bytes_per_token(config: dict) -> int | None:
    """Bytes one token takes in the whole model's KV cache (keys and values of every layer),
    from ``config.json``; None when the config does not say (then only the count bounds)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers, heads = text.get("num_hidden_layers"), text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim")
    if not head_dim and heads and text.get("hidden_size"):
        head_dim = text["hidden_size"] // heads
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16")
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 2)


class PromptCache:
    """``entries`` earlier sequences at most, holding at most ``max_bytes`` of the whole
    model's KV cache (counted as tokens x ``token_bytes``; 0: no byte bound); entries=0
    turns prefix caching off."""

    def __init__(self, entries: int, max_bytes: int = 0, token_bytes: int | None = None):
        self._lru = LRUPromptCache(max_size=entries) if entries > 0 else None
        self.max_bytes = max_bytes
        self.token_bytes = token_bytes
        _LIVE.add(self)

    def fetch(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the best cache for ``prompt`` and how many of its first tokens
        that cache holds: always fewer than all, since the last prompt token must run to
        give the first logits. ``(None, 0)`` when nothing is reusable."""
        if self._lru is None:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_KEY, prompt)
        if cache is None:
            return None, 0
        reused = len(prompt) - len(rest)
        if reused >= len(prompt):
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, reused - len(prompt) + 1)
            reused = len(prompt) - 1
        if reused <= 0:
            return None, 0
        return cache, reused

    def store(self, tokens: list[int], cache: list[Any] | None) -> None:
        """Keep the cache of a finished sequence (``tokens``: exactly what it holds)."""
        if self._lru is not None and cache and tokens:
            mx.eval([c.state for c in cache])  # cut loose from the batch buffers (above)
            self._lru.insert_cache(_KEY, list(tokens), cache)
            self._bound()

    def _bound(self) -> None:
        """Evict least recently used entries until the byte figure fits (same on every rank)."""
        if not self.max_bytes or not self.token_bytes or self._lru is None:
            return
        while len(self._lru) and self.tokens * self.token_bytes > self.max_bytes:
            self._lru.trim_to(n_sequences=len(self._lru) - 1)

    @property
    def tokens(self) -> int:
        """Tokens held by all entries (mlx-lm's LRU lists every entry's tokens, per kind)."""
        if self._lru is None:
            return 0
        return sum(len(tokens) for lru in self._lru._lru._lrus.values() for _, tokens in lru)

    @property
    def counted_bytes(self) -> int:
        """The rank-independent byte figure the bound applies to."""
        return self.tokens * (self.token_bytes or 0)

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0
