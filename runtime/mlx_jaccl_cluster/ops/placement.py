"""Placement: which layout, which layers on which rank, and whether each rank's share fits.

Pure Python on the controller, before any node changes (readiness runs it once every
node's memory is known). From the model folder it reads ``config.json`` and the
safetensors headers (the exact bytes of every tensor, grouped by layer); from each node its
memory (``mjc_node`` of readiness: physical memory, and on macOS the GPU wired limit
``iogpu.wired_limit_mb`` when it is set). Then:

- the layout: ``layout.choose`` (the same function the ranks run), over the plan's world size;
- for pipeline, the layers per rank: an explicit ``cluster_layers`` per host wins; the
  other ranks share the remaining layers in proportion to their usable memory, after each
  has paid for what every stage holds (embeddings, final norm, head) and its KV cache;
- the fit check: each rank's bytes (its weights + the KV cache of ``max_batch`` sequences
  of ``max_context`` tokens over its layers + its share of the prompt cache, which keeps
  finished sequences' KV cache up to ``prompt_cache_bytes`` of the whole model's, at most
  ``prompt_cache_size`` sequences of ``max_context`` tokens + a fixed runtime overhead)
  against its share of its machine's usable memory. A rank that does not fit is a problem naming the host,
  the shortfall in GiB and the fixes.

The estimates are upper bounds where the model makes them so (every layer's KV cache at the
full context, also for sliding-window layers).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import stage_files
from ..layout import LayoutError, choose, mixin_pipeline, num_layers, text_config
from . import manifest

GiB = 1 << 30
#: What a rank costs beyond weights and KV cache: Python, MLX, the tokenizer, the HTTP
#: server on rank 0 (about 0.17 GiB RSS measured here on a tiny model; rounded up).
RANK_OVERHEAD_BYTES = GiB // 2
#: Share of physical memory a Mac's GPU may wire when iogpu.wired_limit_mb is unset
#: (macOS's default working-set limit is about two thirds to three quarters of memory).
DEFAULT_GPU_SHARE = 0.70
_LAYER = stage_files.LAYER
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlacementError(ValueError):
    """The model folder cannot be read for placement; the message says what to fix."""


def tensor_sizes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in the folder's ``*.safetensors`` files, from their headers only."""
    sizes: dict[str, int] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise PlacementError(f"{folder} holds no *.safetensors files")
    for path in files:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise PlacementError(f"{path} is not a safetensors file (too short); re-fetch the model")
            (length,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise PlacementError(f"{path} has no valid safetensors header; re-fetch the model") from None
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    return sizes


@dataclass
class Footprint:
    """What a model costs: bytes every pipeline stage holds, bytes per layer, KV per token."""

    shared_bytes: int
    layer_bytes: list[int]
    kv_bytes_per_token_layer: int
    context: int

    @property
    def total_bytes(self) -> int:
        return self.shared_bytes + sum(self.layer_bytes)


def footprint(config: Mapping[str, Any], sizes: Mapping[str, int], max_context: int | None = None) -> Footprint:
    """The model's :class:`Footprint` from its config and tensor sizes."""
    n = num_layers(dict(config))
    if n is None:
        raise PlacementError("config.json names no layer count (num_hidden_layers)")
    layers = [0] * n
    shared = 0
    for name, size in sizes.items():
        found = _LAYER.search(name)
        if found and int(found.group(1)) < n:
            layers[int(found.group(1))] += size
        elif not found:
            shared += size
    text = text_config(dict(config))
    heads = text.get("num_attention_heads") or 1
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads)
    dtype = _DTYPE_BYTES.get(str(text.get("torch_dtype", config.get("torch_dtype"))), 2)
    context = max_context or text.get("max_position_embeddings") or 4096
    return Footprint(shared, layers, 2 * kv_heads * head_dim * dtype, int(context))


def usable_memory(node: Mapping[str, Any]) -> int:
    """Bytes one machine can give the model: the GPU wired limit where macOS sets one,
    :data:`DEFAULT_GPU_SHARE` of memory on other Macs, all physical memory elsewhere."""
    memory = int(node.get("memory_bytes") or 0)
    wired = node.get("wired_limit_mb")
    if isinstance(wired, int) and wired > 0:
        return wired << 20
    if node.get("system") == "Darwin":
        return int(memory * DEFAULT_GPU_SHARE)
    return memory


@dataclass
class RankNeed:
    host: str
    rank: int
    layers: tuple[int, int] | None  # pipeline: [start, end)
    weights: int
    kv: int
    available: int
    machine_ranks: int = 1
    prompt_cache: int = 0

    @property
    def need(self) -> int:
        return self.weights + self.kv + self.prompt_cache + RANK_OVERHEAD_BYTES


@dataclass
class Placement:
    parallel: str
    reason: str
    split: list[int] = field(default_factory=list)
    ranks: list[RankNeed] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: each rank's layers are known here (the generic split, or mlx-lm's PipelineMixin, which
    #: runs the split in reverse); False for a class with its own pipeline(): every file then
    layers_known: bool = True


def weighted_split(n_layers: int, weights: list[float], fixed: list[int | None]) -> list[int]:
    """Layers per rank: ``fixed[r]`` where given, the rest in proportion to ``weights``
    (largest remainder), at least one each. Raises ValueError when that is impossible."""
    free = [r for r, f in enumerate(fixed) if f is None]
    left = n_layers - sum(f for f in fixed if f is not None)
    if left < len(free) or (not free and left):
        raise ValueError(
            f"the cluster_layers given ({[f for f in fixed if f is not None]}) leave {left} of the "
            f"model's {n_layers} layers for {len(free)} other rank(s)"
        )
    split = list(fixed)
    if free:
        w = [max(weights[r], 0.0) for r in free]
        total = sum(w)
        target = [(x / total if total else 1 / len(free)) * left for x in w]
        alloc = [max(1, int(t)) for t in target]
        while sum(alloc) < left:  # largest remainder first
            i = max(range(len(free)), key=lambda i: (target[i] - alloc[i], -i))
            alloc[i] += 1
        while sum(alloc) > left:  # the minimum of one layer overshot: take from the most over
            i = max((i for i in range(len(free)) if alloc[i] > 1), key=lambda i: (alloc[i] - target[i], i))
            alloc[i] -= 1
        for i, r in enumerate(free):
            split[r] = alloc[i]
    return split


def place(
    ranks: list[str],
    config: Mapping[str, Any],
    sizes: Mapping[str, int],
    nodes: Mapping[str, Mapping[str, Any]],
    parallel: str = "auto",
    max_batch: int = 8,
    max_context: int | None = None,
    layers: Mapping[str, int | None] | None = None,
    machines: Mapping[str, str] | None = None,
    prompt_cache_bytes: int = 0,
    prompt_cache_size: int = 0,
    generic: bool = False,
    backend: str | None = None,
    handover: str = "auto",
) -> Placement:
    """Layout, split and fit of the model over ``ranks`` (hostnames in rank order).

    ``nodes``: hostname -> readiness facts (memory_bytes, system, wired_limit_mb);
    ``layers``: hostname -> explicit pipeline layer count (cluster_layers);
    ``machines``: hostname -> machine key, so ranks sharing a machine share its memory;
    ``prompt_cache_bytes`` / ``prompt_cache_size``: the runtime's prompt cache bounds
    (Settings), whose KV memory the ranks hold in proportion to their layers; ``generic``:
    the generic split even where mlx-lm's class has its own pipeline() (Settings);
    ``backend``: the MLX backend and ``handover`` the pipeline_transport setting (where a
    stage hands over by all_gather, the generic split runs: ``layout.choose``).
    """
    world = len(ranks)
    fp = footprint(config, sizes, max_context)
    try:
        layout = choose(dict(config), world, parallel, backend, handover)
    except LayoutError as exc:
        return Placement(parallel, "", problems=[f"{ranks[0]}: cluster_parallel: {exc}"])
    machines = machines or {h: h for h in ranks}
    per_machine: dict[str, int] = {}
    for h in ranks:
        per_machine[machines[h]] = per_machine.get(machines[h], 0) + 1
    available = [usable_memory(nodes.get(h, {})) // per_machine[machines[h]] for h in ranks]
    kv_per_layer = fp.kv_bytes_per_token_layer * fp.context * max_batch
    n = len(fp.layer_bytes)
    cached = prompt_cache_total(fp, prompt_cache_bytes, prompt_cache_size)
    result = Placement(layout.parallel, layout.reason)
    native = layout.native_pipeline and not generic
    reverse = native and mixin_pipeline(str(config.get("model_type")))
    result.layers_known = not native or reverse
    explicit = {h: v for h, v in (layers or {}).items() if v is not None}
    if explicit and layout.parallel != "pipeline":
        result.problems += [
            f"{h}: cluster_layers: is {v} but the layout is {layout.parallel} ({layout.reason}); "
            "remove it or set cluster_parallel: pipeline"
            for h, v in sorted(explicit.items())
        ]
        return result
    if layout.parallel == "pipeline":
        per_layer = (sum(fp.layer_bytes) / n) + kv_per_layer + cached / n
        weights = [max(a - fp.shared_bytes - RANK_OVERHEAD_BYTES, 0) / per_layer for a in available]
        try:
            result.split = weighted_split(n, weights, [explicit.get(h) for h in ranks])
        except ValueError as exc:
            result.problems.append(f"{ranks[0]}: cluster_layers: {exc}; make them sum to {n} or leave some unset")
            return result
        for r, h in enumerate(ranks):
            start, end = stage_files.stage_range(result.split, r, reverse)
            result.ranks.append(
                RankNeed(
                    h,
                    r,
                    (start, end),
                    fp.shared_bytes + sum(fp.layer_bytes[start:end]),
                    kv_per_layer * (end - start),
                    available[r],
                    per_machine[machines[h]],
                    cached * (end - start) // n,
                )
            )
    else:
        # tensor: mlx-lm's shard() splits the layers' projections; embeddings, norms and
        # the head stay whole on every rank.
        for r, h in enumerate(ranks):
            result.ranks.append(
                RankNeed(
                    h,
                    r,
                    None,
                    fp.shared_bytes + sum(fp.layer_bytes) // world,
                    kv_per_layer * n // world,
                    available[r],
                    per_machine[machines[h]],
                    cached // world,
                )
            )
    for need in result.ranks:
        if need.need > need.available:
            result.problems.append(_shortfall(need, result, fp, world, max_batch, prompt_cache_bytes))
    return result


def prompt_cache_total(fp: Footprint, prompt_cache_bytes: int, prompt_cache_size: int) -> int:
    """Bytes of the whole model's KV cache the prompt cache may keep: ``prompt_cache_bytes``
    (engine/prompt_cache.py counts tokens x the whole model's per-token KV size against it),
    but never more than ``prompt_cache_size`` sequences of the full context; 0 bytes means
    no byte bound, so the entry count alone bounds it."""
    if prompt_cache_size <= 0:
        return 0
    by_entries = prompt_cache_size * fp.context * fp.kv_bytes_per_token_layer * len(fp.layer_bytes)
    return min(prompt_cache_bytes, by_entries) if prompt_cache_bytes > 0 else by_entries


def _shortfall(
    need: RankNeed, placement: Placement, fp: Footprint, world: int, max_batch: int, prompt_cache_bytes: int = 0
) -> str:
    short = (need.need - need.available) / GiB
    share = f" (its machine's usable memory shared by {need.machine_ranks} ranks)" if need.machine_ranks > 1 else ""
    what = f"layers {need.layers[0]}..{need.layers[1] - 1}" if need.layers else f"1/{world} of every layer"
    fixes = ["more ranks"]
    if placement.parallel == "tensor":
        fixes.append("cluster_parallel: pipeline (weighted by memory)")
    elif placement.split:
        fixes.append("fewer layers here (cluster_layers) and more on a larger node")
    fixes += [
        "a quantized model (mlx_lm.convert -q)",
        f"a smaller context or batch (cluster_runtime_settings max_context, now {fp.context}; max_batch, now {max_batch})",
    ]
    if need.prompt_cache:
        now = f"{prompt_cache_bytes / GiB:.2f} GiB" if prompt_cache_bytes else "0 (no byte bound)"
        fixes.append(
            f"a smaller prompt cache (cluster_runtime_settings prompt_cache_bytes, now {now}; or prompt_cache_size)"
        )
    return (
        f"{need.host}: rank {need.rank} needs {need.need / GiB:.2f} GiB ({what}: weights {need.weights / GiB:.2f} GiB, "
        f"KV cache {need.kv / GiB:.2f} GiB for {max_batch} x {fp.context} tokens, "
        f"prompt cache {need.prompt_cache / GiB:.2f} GiB, runtime "
        f"{RANK_OVERHEAD_BYTES / GiB:.2f} GiB) but has {need.available / GiB:.2f} GiB{share}: "
        f"{short:.2f} GiB short. Fixes: {'; '.join(fixes)}"
    )


def _amount(n_bytes: int) -> str:
    """GiB as the fit check prints them; MiB below one GiB (a small share reads as more than 0.00)."""
    return f"{n_bytes / GiB:.2f} GiB" if abs(n_bytes) >= GiB else f"{n_bytes / (1 << 20):.1f} MiB"


def disk_problems(
    host: str, disk: Mapping[str, Any], node_manifest: Mapping[str, Any], headroom: int | str
) -> list[str]:
    """Whether a node's disk takes what it will hold: the files of its manifest (its share of
    a pipeline, the whole model otherwise: ``manifest.node_manifest``) that are not already
    in place with their size, plus ``headroom`` (venv and wheels) on the install prefix.

    ``disk`` is readiness's probe of the node: ``prefix`` and ``model`` (each ``{"path",
    "dev", "free"}``: the deepest existing folder of the install prefix / the model path, its
    device and free bytes) and ``present`` (relative path -> size of the files already in the
    model folder). When both are on one device, one total is checked against it. A problem
    names the host, the GiB needed and free, and the fixes."""
    headroom = int(headroom)
    files = node_manifest.get("files", {})
    present = disk.get("present") or {}
    missing = {rel: int(meta["size"]) for rel, meta in files.items() if present.get(rel) != meta["size"]}
    to_copy = sum(missing.values())
    label = manifest.share_label(dict(node_manifest))
    what = label or f"the whole model, {len(files)} files"
    model, prefix = disk["model"], disk["prefix"]
    parts = [
        (
            model,
            to_copy,
            f"{what}: {_amount(to_copy)} still to copy of {_amount(manifest.share_bytes(dict(node_manifest)))}",
        )
    ]
    if prefix["dev"] == model["dev"]:
        parts[0] = (model, to_copy + headroom, parts[0][2] + f", + {_amount(headroom)} for the venv and wheels")
    else:
        parts.append((prefix, headroom, f"{_amount(headroom)} for the venv and wheels"))
    if label:
        fixes = ["fewer layers on this node (cluster_layers) and more on a node with room", "more ranks"]
    elif stage_files.INDEX in files:
        fixes = ["cluster_parallel: pipeline (each node then receives only the files of its layers)"]
    else:
        fixes = []
    found = []
    for where, need, why in parts:
        free = int(where["free"])
        if need > free:
            found.append(
                f"{host}: {where['path']} has {_amount(free)} free but needs {_amount(need)} ({why}): "
                f"{_amount(need - free)} short. Fixes: free {_amount(need - free)} there; put cluster_install_prefix "
                f"and cluster_model_path on a larger volume; " + "; ".join(fixes + ["a smaller (quantized) model"])
            )
    return found


def summary(placement: Placement) -> list[str]:
    """One line per rank, for the plan's log."""
    return [
        f"rank {n.rank} {n.host}: "
        + (f"layers {n.layers[0]}..{n.layers[1] - 1}, " if n.layers else "")
        + f"{n.need / GiB:.2f} of {n.available / GiB:.2f} GiB"
        for n in placement.ranks
    ]


def parse_wired_limit(text: str) -> int | None:
    """``sysctl -n iogpu.wired_limit_mb`` -> MiB, None when unset (0) or not a number
    (the sysctl is absent on Linux and older macOS)."""
    text = (text or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def place_plan(
    plan: Mapping[str, Any],
    model_dir: str,
    nodes: Mapping[str, Mapping[str, Any]],
    parallel: str,
    runtime: Mapping[str, Any] | None = None,
    layers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan with its layout resolved for the model in ``model_dir``: ``parallel``,
    ``parallel_reason``, ``split`` and each rank's ``MJC_PIPELINE_SPLIT``; plus ``problems``
    (ranks that do not fit, a bad cluster_layers) and ``summary`` lines. ``MJC_PARALLEL``
    stays the setting (auto): each rank resolves it with the same ``layout.choose`` and
    so reports the same reason on /health.

    ``nodes``: hostname -> readiness facts; ``runtime``: cluster_runtime_settings (max_batch,
    max_context; Settings' defaults otherwise); ``layers``: hostname -> cluster_layers
    (default: each plan entry's ``layers``).
    """
    from ..settings import Settings

    runtime = dict(runtime or {})
    folder = Path(model_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
        sizes = tensor_sizes(folder)
    except (OSError, json.JSONDecodeError, PlacementError) as exc:
        return {
            "plan": dict(plan),
            "problems": [f"{plan['ranks'][0]}: model: cannot read {folder} for placement: {exc}"],
            "summary": [],
        }
    defaults = {k: f.default for k, f in Settings.model_fields.items()}
    max_batch = int(runtime.get("max_batch", defaults["max_batch"]))
    max_context = runtime.get("max_context", defaults["max_context"])
    ranks = list(plan["ranks"])
    machines = {h: plan["hosts"][h]["ssh"] for h in ranks}
    facts = {h: dict(nodes.get(h) or {}) for h in ranks}
    for f in facts.values():
        f["wired_limit_mb"] = parse_wired_limit(str(f.get("wired_limit_mb_raw", "")))
    if layers is None:  # the plan's own cluster_layers (ops/plan.py)
        layers = {h: plan["hosts"][h].get("layers") for h in ranks}
    placement = place(
        ranks,
        config,
        sizes,
        facts,
        parallel,
        max_batch,
        max_context,
        {h: v for h, v in layers.items() if v is not None},
        machines,
        int(runtime.get("prompt_cache_bytes", defaults["prompt_cache_bytes"])),
        int(runtime.get("prompt_cache_size", defaults["prompt_cache_size"])),
        bool(runtime.get("generic_pipeline", defaults["generic_pipeline"])),
        plan.get("backend"),
        str(runtime.get("pipeline_transport", defaults["pipeline_transport"])),
    )
    out = json.loads(json.dumps(plan))  # a deep copy of plain data
    resolved = placement.parallel if placement.parallel in ("tensor", "pipeline") else "tensor"
    out.update(parallel=resolved, parallel_reason=placement.reason, split=placement.split)
    for h in ranks:
        env = out["hosts"][h]["env"]
        if placement.split:
            env["MJC_PIPELINE_SPLIT"] = ",".join(str(n) for n in placement.split)
        else:
            env.pop("MJC_PIPELINE_SPLIT", None)
    problems = list(placement.problems)
    try:
        files = machine_files(out, folder, config, placement)
    except stage_files.StageFilesError as exc:
        files, problems = {}, problems + [f"{ranks[0]}: model: {exc}"]
    stages = machine_layers(out, placement)
    lines = []
    for h in ranks:
        out["hosts"][h].pop("model_files", None)
        out["hosts"][h].pop("model_layers", None)
        if h in files:
            out["hosts"][h]["model_files"] = files[h]
            out["hosts"][h]["model_layers"] = stages[h]
            if out["hosts"][h].get("primary", True):
                lines.append(
                    f"{h}: receives {len(files[h])} of the model's files (layers {manifest.layer_ranges(stages[h])})"
                )
    return {
        "plan": out,
        "problems": problems,
        "summary": [f"{resolved}: {placement.reason}"] + summary(placement) + lines,
    }


def _machine(plan: Mapping[str, Any], host: str) -> tuple[str, str]:
    """Ranks with the same ssh target and install prefix share one model folder (the plan's ``primary``)."""
    entry = plan["hosts"][host]
    return entry["ssh"], entry.get("prefix", "")


def machine_layers(plan: Mapping[str, Any], placement: Placement) -> dict[str, list[list[int]]]:
    """hostname -> ``[start, end)`` of every pipeline stage its machine's folder serves (the
    plan's ``model_layers``; what ``make status`` names beside the files)."""
    stages: dict[tuple[str, str], list[list[int]]] = {}
    for need in placement.ranks:
        if need.layers:
            stages.setdefault(_machine(plan, need.host), []).append(list(need.layers))
    return {need.host: sorted(stages.get(_machine(plan, need.host), [])) for need in placement.ranks}


def machine_files(
    plan: Mapping[str, Any], folder: Path, config: Mapping[str, Any], placement: Placement
) -> dict[str, list[str]]:
    """hostname -> the model files its machine must hold (stage_files.py), for pipeline
    layouts of a model with a weight index; ranks that share a machine (ssh target and
    install prefix, as the plan's ``primary``) share its folder, so each gets the union of
    their stages. Empty (every node gets every file) for tensor layouts and one-file models."""
    weight_map = stage_files.read_weight_map(folder)
    if not placement.split or not placement.layers_known or weight_map is None:
        return {}
    n = num_layers(dict(config))
    every = [str(p.relative_to(folder)) for p in manifest.files(folder)]
    stages = machine_layers(plan, placement)
    return {h: stage_files.node_files(every, weight_map, n, [tuple(s) for s in stages[h]]) for h in stages}
