"""Load the model once per rank: mlx-lm ``load`` on one rank, ``sharded_load`` on several.

Everything that can be checked from the folder itself is checked before MLX sees it, so
a bad model is one clear line at start-up, not a traceback from deep inside MLX.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import make_text_state_machine
from mlx_lm.utils import load, load_tokenizer, sharded_load
from mlx_lm.utils import load_model as mlx_lm_load_model

from .. import stage_files
from ..generation import SAMPLING_DEFAULTS
from ..layout import Layout, LayoutError, choose, mixin_pipeline, num_layers
from . import pipeline


class ModelError(Exception):
    """The model folder cannot be served as configured; the message says what to fix."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: dict
    #: mlx-lm's reasoning / tool-call marker machine for this tokenizer (the HTTP side drives it)
    text_machine: Any = None
    #: the sampling fields the model's generation_config.json sets (see read_generation_config)
    generation_config: dict | None = None
    #: how the model is split over the ranks, and why (shown by /health)
    layout: Layout | None = None
    layout_detail: str = ""

    @property
    def context_length(self) -> int | None:
        for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
            value = self.config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        text = self.config.get("text_config")
        if isinstance(text, dict):
            return LoadedModel(None, None, text).context_length
        return None


def read_config(folder: Path) -> dict:
    """``config.json`` of a model folder, after checking the folder looks servable."""
    if not folder.is_dir():
        raise ModelError(
            f"model folder {folder} does not exist; sync the model to this node (site.yml does) or fix MJC_MODEL"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing: {folder} is not an mlx-lm model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc}); re-sync the model") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_path} has no model_type; is this an mlx-lm model folder?")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} holds no *.safetensors weights; re-sync or convert the model with mlx_lm.convert")
    try:
        stage_files.read_weight_map(folder)
    except stage_files.StageFilesError as exc:
        raise ModelError(str(exc)) from None
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json / tokenizer.model); re-sync the model")
    return config


def check_weight_files(folder: Path, config: dict, stage: tuple[int, int] | None = None) -> bool:
    """The weight files this rank needs are all in ``folder``: every file of the weight
    index, or for a pipeline ``stage`` (its ``[start, end)`` layers) only the stage's
    share (stage_files.py: a node may hold just that). Returns True when the folder holds
    less than the whole model; a missing needed file is a ModelError naming it."""
    weight_map = stage_files.read_weight_map(folder)
    if weight_map is None:
        return False
    every = set(weight_map.values())
    if stage is None:
        needed = every
    else:
        n = num_layers(config) or 0
        try:
            needed = stage_files.stage_weight_files(weight_map, n, *stage)
        except ValueError as exc:
            raise ModelError(f"{folder}: {exc}") from None
    missing = sorted(f for f in needed if not (folder / f).is_file())
    if missing:
        share = f" (this rank's layers {stage[0]}..{stage[1] - 1})" if stage else ""
        raise ModelError(
            f"{folder} lacks weight files named in its index that this rank needs{share}: {', '.join(missing)}; "
            "re-sync the model (site.yml copies each node its share)"
        )
    return any(not (folder / f).is_file() for f in every)


def _stand_in_embeddings(model, folder: Path) -> list[str]:
    """A later pipeline stage on a node without the embedding files: its embedding output
    is not used (the stage's first layer receives the hidden state instead; with the
    all_gather hand-over it is this rank's ignored part of the first gather), so the
    embedding gets zero-stride stand-ins of the right shape that hold no memory. Refused
    when the model has no separate head (tied: the embedding computes every rank's logits)."""
    weight_map = stage_files.read_weight_map(folder) or {}
    absent = sorted(f for f in stage_files.embedding_files(weight_map) if not (folder / f).is_file())
    if not absent:
        return []
    names = {name for name, _ in model.named_modules()}
    if stage_files.tied(weight_map) or not any(stage_files.HEAD.search(f"{n}.") for n in names):
        raise ModelError(
            f"{folder} lacks {', '.join(absent)}, which hold the embeddings this model's head is tied to; "
            "re-sync the model (site.yml copies them to every stage of a tied model)"
        )
    stood_in = []
    for name, module in model.named_modules():
        if stage_files.EMBEDDING.search(f"{name}.") and not stage_files.LAYER.search(f"{name}."):
            module.update(
                {k: mx.broadcast_to(mx.zeros((), dtype=v.dtype), v.shape) for k, v in module.parameters().items()}
            )
            stood_in.append(name)
    return stood_in


#: What a sampling default in generation_config.json must be, and how to say it.
_SAMPLING_CHECKS = {
    "temperature": (lambda v: v >= 0, "a number >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "a number > 0"),
}
assert set(_SAMPLING_CHECKS) == set(SAMPLING_DEFAULTS)


def read_generation_config(folder: Path) -> dict:
    """The sampling defaults the model ships in ``generation_config.json`` (as vLLM reads
    them: temperature, top_p, top_k, min_p, repetition_penalty; other keys such as
    ``do_sample`` or token ids are not sampling defaults). Empty when there is no file;
    a value of the wrong kind is a ModelError naming the file and the key."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    found = {}
    for name, (ok, what) in _SAMPLING_CHECKS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ModelError(
                f"{path}: {name} is {value!r}; it must be {what} (fix the file, or remove the key "
                f"and set default_{name} in cluster_runtime_settings)"
            )
        found[name] = value
    return found


def check_split(
    config: dict, parallel: str, world_size: int, backend: str | None = None, handover: str = "auto"
) -> Layout:
    """The layout (``layout.choose``) for this model, group size, settings and backend; a split
    the model (or the backend) cannot take is a :class:`ModelError` naming the numbers involved."""
    try:
        return choose(config, world_size, parallel, backend, handover)
    except LayoutError as exc:
        raise ModelError(str(exc)) from None


@contextmanager
def _collectives_on_gpu(backend: str | None):
    """nccl only: ``sharded_load`` ends with a barrier, ``all_sum(..., stream=mx.cpu)``, but
    MLX's nccl group runs collectives on CUDA streams only; run that one on the default
    (GPU) stream instead. Other backends are left as they are."""
    if backend != "nccl":
        yield
        return
    original = mx.distributed.all_sum

    def all_sum(x, *args, stream=None, **kwargs):
        return original(x, *args, **kwargs)

    mx.distributed.all_sum = all_sum
    try:
        yield
    finally:
        mx.distributed.all_sum = original


def _barrier(group, backend: str | None) -> None:
    """Every rank has its weights before any serves (a slow loader would time others out).
    nccl runs collectives on the GPU stream only."""
    stream = None if backend == "nccl" else mx.cpu
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=stream))


def _pipeline_load(
    folder: Path, config: dict, group, layout: Layout, split: list[int], backend: str | None, generic: bool = False
):
    """This rank's pipeline stage: mlx-lm's own ``pipeline()`` where the class has one
    (and takes a split), the generic split (engine/pipeline.py) otherwise. Weights load
    lazily, so only this rank's layers (plus embeddings, norm, head) are ever read."""
    n = num_layers(config) or 0
    split = pipeline.check_split(split or pipeline.even_split(n, group.size()), n, group.size())
    native = layout.native_pipeline and not generic
    # mlx-lm's PipelineMixin runs the split in reverse (rank 0: the last layers)
    reverse = native and mixin_pipeline(str(config.get("model_type")))
    if check_weight_files(folder, config, stage_files.stage_range(split, group.rank(), reverse)):
        # This node holds only its share: load what is there, the rest is never evaluated.
        model, loaded_config = mlx_lm_load_model(folder, lazy=True, strict=False)
        tokenizer = load_tokenizer(folder, eos_token_ids=loaded_config.get("eos_token_id"))
        partial = True
    else:
        model, tokenizer = load(str(folder), lazy=True)
        partial = False
    layers = pipeline.layer_list(model)
    if len(layers) != n:
        raise ModelError(f"{folder}: config.json names {n} layers but the model has {len(layers)}; re-sync the model")
    own = getattr(getattr(model, "model", None), "pipeline", None)
    if native and own is not None and "split" in inspect.signature(own).parameters:
        own(group, split=split)
        span = (model.model.start_idx, model.model.end_idx)
        how = "mlx-lm pipeline()"
    else:
        span = pipeline.install(model, group, split, layout.handover)
        how = "generic split" + (", all_gather hand-over" if layout.handover == "all_gather" else "")
    if partial:  # the layers this rank really runs: their files must be here (else random weights)
        check_weight_files(folder, config, span)
    if partial and span[0] > 0:
        _stand_in_embeddings(model, folder)
    mx.eval(model.parameters())
    _barrier(group, backend)
    share = ", from this node's share of the files" if partial else ""
    return model, tokenizer, f"{how}, layers {span[0]}..{span[1] - 1} of {len(layers)} (split {split}){share}"


def load_model(
    folder: Path,
    parallel: str,
    group: mx.distributed.Group | None,
    backend: str | None = None,
    split: list[int] | None = None,
    generic: bool = False,
    handover: str = "auto",
) -> LoadedModel:
    """Load (and shard, when ``group`` has several ranks) the model in ``folder``.
    ``backend`` is the MLX backend of ``group`` (settings' ``mlx_backend``); ``split`` the
    pipeline layers per rank (empty: even); ``generic``: the generic split even where the
    class has its own ``pipeline()``; ``handover``: the pipeline_transport setting."""
    config = read_config(folder)
    generation_config = read_generation_config(folder)
    world = group.size() if group is not None else 1
    layout = check_split(config, parallel, world, backend, handover)
    detail = ""
    try:
        if layout.parallel != "pipeline":
            check_weight_files(folder, config)
        if world == 1:
            model, tokenizer = load(str(folder))
        elif layout.parallel == "tensor":
            with _collectives_on_gpu(backend):
                model, tokenizer = sharded_load(str(folder), tensor_group=group)
        else:
            model, tokenizer, detail = _pipeline_load(
                folder, config, group, layout, list(split or []), backend, generic
            )
    except pipeline.SplitError as exc:
        raise ModelError(str(exc)) from None
    except ValueError as exc:
        raise ModelError(f"could not load {folder}: {exc}") from None
    except (FileNotFoundError, OSError, RuntimeError, KeyError) as exc:
        raise ModelError(f"could not load {folder}: {type(exc).__name__}: {exc}; re-sync the model") from None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        text_machine=make_text_state_machine(tokenizer),
        generation_config=generation_config,
        layout=layout,
        layout_detail=detail,
    )
