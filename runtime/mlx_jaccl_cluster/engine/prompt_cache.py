"""Prefix caching: a later prompt that starts like an earlier one (a chat's next turn, a
shared system prompt) reuses that prompt's KV cache instead of computing it again.

mlx-lm's ``LRUPromptCache`` does the bookkeeping (a token trie, nearest match, trimming a
longer entry, LRU eviction). Every rank keeps its own, holding its own shard of each KV
cache, and applies the same fetches and stores in the same order, so the caches agree
across ranks. They must: a rank that reused fewer tokens would run a different number of
forward passes and the group's collectives would no longer pair up. So rank 0 sends the
number of reused tokens with each insert and the other ranks check theirs against it
(engine/core.py). Eviction is by entry count, never by bytes (pipeline stages hold
different numbers of layers, so their byte counts differ).
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_KEY = "model"  # one model per process


class PromptCache:
    """``entries`` earlier sequences at most; 0 turns prefix caching off."""

    def __init__(self, entries: int):
        self._lru = LRUPromptCache(max_size=entries) if entries > 0 else None

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
            self._lru.insert_cache(_KEY, list(tokens), cache)

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0
