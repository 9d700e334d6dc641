"""One change to mlx-lm's batch engine for the commonest case: one sequence decoding.

``BatchGenerator`` keeps every sequence in a ``BatchKVCache``, whose attention mask is an
array (causal and left padding) on every step, also when the batch holds one sequence
and one new token, where that mask is all true. An array mask keeps MLX's attention on
its general path; with no mask it takes the single-query kernel, as ``stream_generate``
does. A batch of one never holds left padding (a prompt is padded to the longest of its
batch, and ``filter`` drops the padding all remaining rows share), so dropping the mask
there changes no result.
"""

from __future__ import annotations

from mlx_lm.models.cache import BatchKVCache

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


def install() -> None:
    """Patch ``BatchKVCache.make_mask`` (idempotent; every rank must do the same)."""
    BatchKVCache.make_mask = _make_mask
