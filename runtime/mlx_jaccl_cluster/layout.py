"""How a model is split over the ranks: one decision, made the same way on the controller
(the plan, ``ops/plan.py``) and on every rank (``engine/loader.py``).

No MLX here: what a model class can do is read from the installed mlx-lm's source (a
``shard`` method: tensor parallel; ``pipeline``: mlx-lm's own pipeline split), so the
controller can decide without importing MLX, and both sides read the same mlx-lm.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

PARALLEL_CHOICES = ("auto", "tensor", "pipeline")


class LayoutError(ValueError):
    """The model cannot be split as asked; the message names the numbers and the fix."""


def text_config(config: dict) -> dict:
    """The language model's part of ``config`` (multimodal configs nest it)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def num_layers(config: dict) -> int | None:
    text = text_config(config)
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _mlx_lm_dir() -> Path | None:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def _remapping() -> dict:
    root = _mlx_lm_dir()
    if root is None:
        return {}
    tree = ast.parse((root / "utils.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


@functools.cache
def capabilities(model_type: str) -> tuple[bool, bool]:
    """``(shards, pipelines)``: whether mlx-lm's class for ``model_type`` has ``shard()``
    (tensor parallel) and its own ``pipeline()``. ``(False, False)`` when mlx-lm has no
    such module (the loader then names the type)."""
    root = _mlx_lm_dir()
    if root is None:
        return False, False
    name = _remapping().get(model_type, model_type)
    path = root / "models" / f"{name}.py"
    if not path.is_file():
        return False, False
    tree = ast.parse(path.read_text())
    shards = pipelines = False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            shards |= node.name == "shard"
            pipelines |= node.name == "pipeline"
        elif isinstance(node, ast.ClassDef):
            pipelines |= any(getattr(b, "id", None) == "PipelineMixin" for b in node.bases)
    return shards, pipelines


@functools.cache
def mixin_pipeline(model_type: str) -> bool:
    """True when mlx-lm's class for ``model_type`` gets ``pipeline()`` from mlx-lm's
    ``PipelineMixin`` and defines none of its own: then rank r runs the layers *after* those
    of ranks r+1.. (the mixin splits in reverse: rank 0 holds the last layers), which the
    controller must know to give each node its layers' files (stage_files.stage_range)."""
    root = _mlx_lm_dir()
    path = root / "models" / f"{_remapping().get(model_type, model_type)}.py" if root else None
    if path is None or not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    own = any(isinstance(n, ast.FunctionDef) and n.name == "pipeline" for n in ast.walk(tree))
    mixin = any(
        isinstance(n, ast.ClassDef) and any(getattr(b, "id", None) == "PipelineMixin" for b in n.bases)
        for n in ast.walk(tree)
    )
    return mixin and not own


def tensor_blockers(config: dict, world: int) -> list[str]:
    """Why tensor parallel over ``world`` ranks cannot take this model ([] when it can).
    mlx-lm's ``shard()`` splits the attention by heads and the MLP by its hidden width, so
    each must divide by ``world`` (else the rank fails at load: "Cannot shard the output")."""
    text = text_config(config)
    heads = text.get("num_attention_heads")
    counts = {
        "num_attention_heads": heads,
        "num_key_value_heads": text.get("num_key_value_heads", heads),
        "intermediate_size": text.get("intermediate_size"),
        "moe_intermediate_size": text.get("moe_intermediate_size"),  # the experts' width (qwen3_moe...)
    }
    return [
        f"{name} ({value}) is not divisible by {world}"
        for name, value in counts.items()
        if isinstance(value, int) and value % world
    ]


def tensor_world_sizes(config: dict, limit: int = 16) -> list[int]:
    """Rank counts up to ``limit`` that tensor parallel can split this model over."""
    return [n for n in range(1, limit + 1) if not tensor_blockers(config, n)]


@dataclass(frozen=True)
class Layout:
    parallel: str  # "tensor" or "pipeline" ("none" on one rank)
    reason: str
    native_pipeline: bool = False  # mlx-lm's own pipeline() (else the generic split)
    handover: str = "send"  # how a pipeline stage hands its hidden state on (TRANSPORTS)


# MLX backends without point-to-point send/recv (measured on mlx 0.32.4's nccl: "[nccl]
# Send/Recv not supported in NCCL backend"; docs/BENCHMARKS.md). A pipeline hands its hidden
# state on with all_gather there, and mlx-lm's own pipeline(), which sends, cannot run.
NO_SEND_RECV = {"nccl": "MLX's nccl backend has no send/recv"}
TRANSPORTS = ("auto", "send", "all_gather")


def transport(backend: str | None, requested: str = "auto") -> str:
    """How a pipeline stage hands its hidden state to the next rank: ``send`` (send/recv,
    wherever the backend has it) or ``all_gather`` (every rank calls it at each stage
    boundary and the next stage takes the sender's slice)."""
    if requested not in TRANSPORTS:
        raise LayoutError(f"pipeline_transport must be one of {', '.join(TRANSPORTS)} (got {requested!r})")
    missing = NO_SEND_RECV.get(backend or "")
    if requested == "auto":
        return "all_gather" if missing else "send"
    if requested == "send" and missing:
        raise LayoutError(f"pipeline_transport=send cannot run on {backend}: {missing}; use auto or all_gather")
    return requested


def choose(
    config: dict, world: int, requested: str = "auto", backend: str | None = None, handover: str = "auto"
) -> Layout:
    """The split for ``config`` over ``world`` ranks; ``requested`` is the setting
    (auto / tensor / pipeline), ``backend`` the MLX backend (None: not known, any),
    ``handover`` the pipeline_transport setting. Raises :class:`LayoutError` for one that
    cannot work."""
    if requested not in PARALLEL_CHOICES:
        raise LayoutError(f"parallel must be one of {', '.join(PARALLEL_CHOICES)} (got {requested!r})")
    model_type = str(config.get("model_type"))
    shards, pipelines = capabilities(model_type)
    if world == 1:
        return Layout("none", "one rank: the whole model in one process")
    blockers = tensor_blockers(config, world)
    if requested == "tensor":
        if not shards:
            raise LayoutError(
                f"model_type {model_type!r} has no tensor-parallel split in mlx-lm (no shard()); "
                "use a model that has one or use parallel=pipeline or auto"
            )
        if blockers:
            raise LayoutError(
                f"tensor parallel over {world} ranks cannot split this model: {'; '.join(blockers)}; it splits "
                f"over {tensor_world_sizes(config)} ranks, or use parallel=pipeline or auto"
            )
        return Layout("tensor", "requested")
    hand = transport(backend, handover)
    # mlx-lm's pipeline() sends: where the hand-over is all_gather, the generic split runs
    native = pipelines and hand == "send"
    why_gather = ""
    if hand == "all_gather":
        why_gather = "; stages hand over by all_gather" + (
            f" ({NO_SEND_RECV[backend]})" if backend in NO_SEND_RECV else ""
        )
    if requested == "pipeline":
        return Layout("pipeline", "requested" + why_gather, native_pipeline=native, handover=hand)
    if shards and not blockers:
        return Layout("tensor", f"auto: {model_type} shards in mlx-lm and its heads and MLP divide by {world}")
    why = "has no shard() in mlx-lm" if not shards else "; ".join(blockers)
    return Layout("pipeline", f"auto: {model_type} {why}{why_gather}", native_pipeline=native, handover=hand)
