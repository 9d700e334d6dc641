"""Which files of a model folder one pipeline stage needs: one decision, made the same way
on the controller (what the model role copies to a node, ``ops/placement.py``) and on the
rank (what the loader checks is there, ``engine/loader.py``).

No MLX here, only the weight index (``model.safetensors.index.json``: tensor name -> file).
A stage ``[start, end)`` needs

- the files holding its own layers' tensors (``...layers.<i>....``, ``start <= i < end``);
  a layer spanning two files needs both;
- the files holding every non-layer tensor it runs: in this runtime every rank runs the
  final norm and the head (each rank computes the same logits from the last rank's hidden
  state and samples the same token, engine/pipeline.py), so those go to every stage; the
  embeddings go to the first stage only, except when they are tied to the head (no head
  tensor in the index), then to every stage. A later stage's embedding is never evaluated
  (its first layer receives the hidden state instead) and the loader gives it a stand-in
  that holds no memory;
- every file that is not a weight file (config, tokenizer, generation config...).

Tensors of layers past the model's layer count (MTP heads, which mlx-lm's ``sanitize``
drops) go nowhere. A model in one ``*.safetensors`` file (no index) goes whole to every
node, and so does every tensor layout: tensor parallel holds a share of every layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

INDEX = "model.safetensors.index.json"
#: A tensor of layer ``i`` of the layer stack (as mlx-lm's own sharded_load matches them).
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: The token (and learned position) embeddings, under the names mlx-lm's models use.
EMBEDDING = re.compile(r"(?:^|\.)(embed_tokens|wte|wpe|tok_embeddings|embed_in|word_embeddings)\.")
#: A separate output head; without one the head is the embedding (tied).
HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.|^output\.")
#: Files of a model folder that are the runtime's own bookkeeping, never the model's.
_OWN = re.compile(r"(^|/)(mjc-manifest\.json|\.mjc-[^/]*)$")


class StageFilesError(ValueError):
    """The weight index cannot be read; the message names the file and the fix."""


def read_weight_map(folder: Path) -> dict[str, str] | None:
    """Tensor name -> file from the folder's weight index; None for a one-file model."""
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise StageFilesError(f"{path} is not a valid weight index ({exc}); re-fetch the model") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise StageFilesError(f"{path}: weight_map must map tensor names to file names; re-fetch the model")
    return weight_map


def tied(weight_map: Mapping[str, str]) -> bool:
    """True when the index holds no separate head: the embedding computes the logits."""
    return not any(HEAD.search(name) and not LAYER.search(name) for name in weight_map)


def stage_range(split: Sequence[int], rank: int, reverse: bool = False) -> tuple[int, int]:
    """``[start, end)`` of ``rank``'s layers under ``split`` (layers per rank). The generic
    split gives rank 0 the first layers; mlx-lm's ``PipelineMixin.pipeline()`` runs the split
    in reverse (``reverse``): rank r takes the layers after those of ranks r+1...size-1."""
    start = sum(split[rank + 1 :]) if reverse else sum(split[:rank])
    return start, start + split[rank]


def stage_weight_files(weight_map: Mapping[str, str], n_layers: int, start: int, end: int) -> set[str]:
    """The weight files the stage running layers ``[start, end)`` of ``n_layers`` needs."""
    if not 0 <= start < end <= n_layers:
        raise ValueError(f"stage layers {start}..{end - 1} are not within the model's {n_layers} layers")
    first, embed_everywhere = start == 0, tied(weight_map)
    files = set()
    for name, file in weight_map.items():
        found = LAYER.search(name)
        if found:
            if start <= int(found.group(1)) < end:
                files.add(file)
        elif first or embed_everywhere or not EMBEDDING.search(name):
            files.add(file)
    return files


def embedding_files(weight_map: Mapping[str, str]) -> set[str]:
    """The files that hold the (untied) embeddings: a later stage may lack them."""
    return {f for name, f in weight_map.items() if EMBEDDING.search(name) and not LAYER.search(name)}


def _weight_file(rel: str) -> bool:
    return rel.endswith(".safetensors")


def node_files(
    all_files: Iterable[str], weight_map: Mapping[str, str] | None, n_layers: int, stages: Iterable[tuple[int, int]]
) -> list[str] | None:
    """What a node must hold, out of ``all_files`` (the folder's relative paths, e.g. the
    manifest's): every non-weight file and the union of its ``stages``' weight files.
    None means every file (a one-file model)."""
    if weight_map is None:
        return None
    needed = set()
    for start, end in stages:
        needed |= stage_weight_files(weight_map, n_layers, start, end)
    return sorted(f for f in all_files if not _OWN.search(f) and (not _weight_file(f) or f in needed))
