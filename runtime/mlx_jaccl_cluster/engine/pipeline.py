"""A pipeline split for any mlx-lm decoder with a layer stack, reusing the model's own forward.

mlx-lm splits a model into pipeline stages only where its class has ``pipeline()``
(qwen2, deepseek...). This module splits the others without re-implementing any of them:
the model's ``layers`` list keeps its length, and each entry is swapped in place for

- a **stage layer** (the rank's own layers, ``start <= i < end``): the real layer, which
  first receives the hidden state from the previous rank (at ``start``, ranks > 0) and
  after the last one sends its output to the next rank (at ``end - 1``, all but the last);
- a **skip layer** (every other index): returns its input unchanged, holds no weights, and
  advances its KV cache by the same number of positions with zero-size keys.

The model's ``__call__`` therefore runs exactly as written: the embedding (and any scale),
the masks it builds per layer index (sliding windows, layer-type lists), the final norm and
head. Skip layers keep every cache's offset right, so a mask built from any layer's cache
(``cache[0]``, ``cache[pattern - 1]``) is the same on every rank; they cost no memory. After
the last layer of the stack every rank takes the last rank's hidden state (one
``all_gather``), so every rank computes the same logits and samples the same token.

On backends without send/recv (nccl) a stage hands over by ``all_gather`` instead
(:class:`Handover`): after rank r's last layer every rank joins one ``all_gather`` and goes
on with rank r's slice, which is rank r+1's input.

Communication is tied to the KV caches, as in mlx-lm's own ``pipeline()``: a stage's send
(or hand-over) is made a dependency of its last layer's cache, so evaluating the caches
(chunked prefill evaluates only those) runs every send, receive and hand-over on every
rank (a hand-over is tied to that layer index's cache everywhere); the final gather runs
only when logits are evaluated, which every rank does at the same steps. The skip layers' cache updates are
made dependencies of the gathered output (:class:`Unevaluated`): nothing else reads them,
and a lazy update nobody evaluates keeps the one before it alive, step after step.

Limits (checked at load, each a clear error): the model needs a ``layers`` list whose
entries are called with the hidden state first and return it (a single array); every cache
must be a plain or rotating KV cache (no SSM / hybrid / chunked caches); layers that share
KV caches with other layers (gemma3n) are not supported.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache


class SplitError(ValueError):
    """The model or the split cannot be pipelined as asked; the message says why."""


def even_split(n_layers: int, world: int) -> list[int]:
    """Layers per rank, as even as possible; the lower ranks take the extra ones."""
    base, extra = divmod(n_layers, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def check_split(split: Sequence[int], n_layers: int, world: int) -> list[int]:
    """``split`` (layers per rank) validated against the model and the group."""
    split = list(split)
    if len(split) != world:
        raise SplitError(
            f"pipeline split {split} has {len(split)} entries for {world} ranks; give one layer count per rank"
        )
    if any(n <= 0 for n in split) or sum(split) != n_layers:
        raise SplitError(
            f"pipeline split {split} must give every rank at least one layer and sum to the model's "
            f"{n_layers} layers (it sums to {sum(split)})"
        )
    return split


def layer_range(split: Sequence[int], rank: int) -> tuple[int, int]:
    """``(start, end)`` of ``rank``'s layers: rank 0 runs the first ``split[0]`` layers."""
    start = sum(split[:rank])
    return start, start + split[rank]


def _cache_param(layer: nn.Module) -> inspect.Signature:
    try:
        sig = inspect.signature(layer.__call__)
    except (TypeError, ValueError):
        raise SplitError(f"cannot read the call signature of {type(layer).__name__}") from None
    if "cache" not in sig.parameters:
        raise SplitError(
            f"{type(layer).__name__}.__call__ takes no 'cache' argument; the generic pipeline split "
            "needs layers called as layer(hidden, mask, cache)"
        )
    return sig


def _cache_of(sig: inspect.Signature, args: tuple, kwargs: dict):
    try:
        return sig.bind_partial(*args, **kwargs).arguments.get("cache")
    except TypeError:
        return None


def _advance(cache, x: mx.array) -> None:
    """Move ``cache`` on by ``x``'s sequence length with zero-size keys and values."""
    if cache is not None:
        empty = mx.zeros((x.shape[0], 0, x.shape[1], 0), dtype=x.dtype)
        cache.update_and_fetch(empty, empty)


class Unevaluated:
    """The arrays the skip layers' cache updates made in the forward under way.

    A skip layer's cache holds no keys, so no attention reads it and nothing would evaluate
    its updates. A batch cache's update is lazy and refers to the previous state (its keys
    and its ``offset`` array), so unevaluated, every decode step would hang one more node
    on each skip layer's chain: about 4 KB per layer and token, held while the batch runs
    (the soak's steady growth outside MLX's buffers). The gathering layer, which every rank
    runs last and whose output every rank evaluates, takes them as dependencies
    (:meth:`settle`), so each step evaluates and frees them with the logits.
    """

    def __init__(self) -> None:
        self.arrays: list[mx.array] = []

    def clear(self) -> None:
        """A forward starts (layer 0): anything left from one that raised is dropped."""
        self.arrays = []

    def add(self, cache) -> None:
        if cache is not None:
            self.arrays.extend(v for v in vars(cache).values() if isinstance(v, mx.array))

    def settle(self, x: mx.array) -> mx.array:
        arrays, self.arrays = self.arrays, []
        return mx.depends(x, arrays) if arrays else x


class SkipLayer(nn.Module):
    """Stands in for a layer another rank runs: passes the hidden state through. It keeps
    the scalar attributes of that layer (``use_sliding``, ``layer_type``...), so model code
    that reads them from the layers list still finds them, but none of its weights."""

    def __init__(self, layer: nn.Module, index: int, handover: Handover | None, pending: Unevaluated):
        super().__init__()
        self._sig = _cache_param(layer)
        self._index = index
        self._handover = handover
        self._pending = pending
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
                object.__setattr__(self, key, value)

    def __call__(self, *args, **kwargs):
        x = args[0]
        if self._index == 0:
            self._pending.clear()
        cache = _cache_of(self._sig, args, kwargs)
        _advance(cache, x)
        h = self._handover
        if h is not None and not h.final:  # another rank's stage ends here: join its all_gather
            x = h.take(x)
            _tie(cache, x)
        self._pending.add(cache)
        if h is not None and h.final:
            x = self._pending.settle(h.take(x))
        return x


class StageLayer(nn.Module):
    """One of this rank's own layers, with the stage's receive / send around it."""

    def __init__(
        self,
        layer: nn.Module,
        index: int,
        recv_from: int | None,
        send_to: int | None,
        handover: Handover | None,
        group,
        pending: Unevaluated,
    ):
        super().__init__()
        self.layer = layer
        self._sig = _cache_param(layer)
        self._index = index
        self._recv_from = recv_from
        self._send_to = send_to
        self._handover = handover
        self._group = group
        self._pending = pending

    def __getattr__(self, name):
        # Model code may read a layer's attributes (use_sliding, layer_type...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.get("layer")
            if inner is None or name.startswith("_"):
                raise
            return getattr(inner, name)

    def __call__(self, *args, **kwargs):
        x = args[0]
        if self._index == 0:
            self._pending.clear()
        if self._recv_from is not None:
            x = mx.distributed.recv_like(x, self._recv_from, group=self._group)
        out = self.layer(x, *args[1:], **kwargs)
        if not isinstance(out, mx.array):
            raise SplitError(
                f"{type(self.layer).__name__} returns {type(out).__name__}, not the hidden state; "
                "the generic pipeline split needs layers that return one array"
            )
        h = self._handover
        if self._send_to is not None:
            out = mx.distributed.send(out.astype(x.dtype), self._send_to, group=self._group)
            _tie(_cache_of(self._sig, args, kwargs), out)
        elif h is not None and not h.final:  # this stage ends: every rank takes its output
            out = h.take(out.astype(x.dtype))
            _tie(_cache_of(self._sig, args, kwargs), out)
        if h is not None and h.final:
            out = self._pending.settle(h.take(out))
        return out


def _tie(cache, x: mx.array) -> None:
    """Make evaluating ``cache`` run what made ``x`` (a send, a hand-over's all_gather):
    chunked prefill evaluates only the caches, and every rank must run every collective."""
    if cache is not None and getattr(cache, "keys", None) is not None:
        cache.keys = mx.depends(cache.keys, x)


@dataclass(frozen=True)
class Handover:
    """After this layer index, rank ``source``'s hidden state goes to every rank by one
    ``all_gather`` that all ranks call at the same point (each passing its own hidden state
    of the same shape, which the others ignore). ``final``: after the last layer, so every
    rank computes the same logits; otherwise a stage boundary of the all_gather transport
    (layout.transport), where the next stage takes its input from it instead of a recv."""

    group: Any
    source: int
    final: bool

    def take(self, x: mx.array) -> mx.array:
        n = x.shape[0]
        return mx.distributed.all_gather(x, group=self.group)[self.source * n : (self.source + 1) * n]


def layer_list(model: nn.Module) -> list:
    """The model's layer stack (the list object itself, so changes reach the model)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise SplitError(
            f"{type(model).__module__} has no 'layers' list; the generic pipeline split needs a layer stack"
        )
    return layers


def check_caches(model: nn.Module) -> None:
    """Refuse cache kinds the skip layers cannot advance (SSM state, chunked attention)."""
    caches = make_prompt_cache(model)
    bad = sorted({type(c).__name__ for c in caches if type(c) not in (KVCache, RotatingKVCache)})
    if bad:
        raise SplitError(
            f"{type(model).__module__} uses {', '.join(bad)} caches; the generic pipeline split supports "
            "plain and rotating KV caches only (use parallel=tensor if the model shards)"
        )


def install(model: nn.Module, group, split: Sequence[int], transport: str = "send") -> tuple[int, int]:
    """Make this rank one pipeline stage of ``model``; returns its ``(start, end)``.
    ``transport``: how a stage hands its hidden state to the next, ``send`` (send/recv) or
    ``all_gather`` (for backends without send/recv; layout.transport).

    Call it on the lazily loaded model, before its weights are evaluated: the layers
    replaced by skip layers drop their weights, so only this rank's share is ever read.
    """
    if transport not in ("send", "all_gather"):
        raise SplitError(f"unknown pipeline transport {transport!r} (send or all_gather)")
    layers = layer_list(model)
    world, rank = group.size(), group.rank()
    split = check_split(split, len(layers), world)
    check_caches(model)
    start, end = layer_range(split, rank)
    handovers = {len(layers) - 1: Handover(group, world - 1, final=True)}
    if transport == "all_gather":
        for r in range(world - 1):
            handovers[layer_range(split, r)[1] - 1] = Handover(group, r, final=False)
    sends = transport == "send"
    pending = Unevaluated()
    for i, layer in enumerate(layers):
        if start <= i < end:
            layers[i] = StageLayer(
                layer,
                i,
                recv_from=rank - 1 if sends and i == start and rank > 0 else None,
                send_to=rank + 1 if sends and i == end - 1 and rank < world - 1 else None,
                handover=handovers.get(i),
                group=group,
                pending=pending,
            )
        else:
            layers[i] = SkipLayer(layer, i, handovers.get(i), pending)
    return start, end
