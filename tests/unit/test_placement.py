"""Placement (ops/placement.py): the split follows node memory, explicit cluster_layers win,
and a rank whose share does not fit is refused naming the host, the shortfall and the fixes.
Sizes come from a real (tiny) model folder's safetensors headers."""

import json

import pytest

from mlx_jaccl_cluster.ops.placement import (
    GiB,
    footprint,
    place,
    tensor_sizes,
    usable_memory,
    weighted_split,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_jaccl_cluster.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("m") / "phi3", arch="phi3", num_hidden_layers=12)
    return json.loads((folder / "config.json").read_text()), tensor_sizes(folder)


def node(gib, system="Linux", wired_mb=None):
    return {"memory_bytes": int(gib * GiB), "system": system, "wired_limit_mb": wired_mb}


def test_sizes_come_from_the_headers(tiny):
    config, sizes = tiny
    fp = footprint(config, sizes)
    assert len(fp.layer_bytes) == 12 and len(set(fp.layer_bytes)) == 1
    assert fp.shared_bytes == sizes["model.embed_tokens.weight"] + sizes["lm_head.weight"] + sizes["model.norm.weight"]
    # 2 (K and V) x 6 kv heads x 32 dims x 4 bytes (float32)
    assert fp.kv_bytes_per_token_layer == 2 * 6 * 32 * 4
    assert fp.context == config["max_position_embeddings"]


def test_usable_memory_prefers_the_wired_limit_on_macs():
    assert usable_memory(node(64, "Darwin", wired_mb=56 * 1024)) == 56 * GiB
    assert usable_memory(node(64, "Darwin")) == int(64 * GiB * 0.70)
    assert usable_memory(node(24)) == 24 * GiB


def test_weighted_split():
    assert weighted_split(12, [1, 1], [None, None]) == [6, 6]
    assert weighted_split(12, [3, 1], [None, None]) == [9, 3]
    assert weighted_split(30, [1, 2, 3], [None, None, None]) == [5, 10, 15]
    assert weighted_split(12, [100, 1], [None, None]) == [11, 1]  # every rank keeps one layer
    assert weighted_split(12, [1, 1, 1], [None, 2, None]) == [5, 2, 5]
    with pytest.raises(ValueError, match="leave 0 of the model's 12 layers for 1 other"):
        weighted_split(12, [1, 1, 1], [6, 6, None])


def test_uneven_memory_gives_the_weighted_split(tiny):
    config, sizes = tiny
    p = place(["big", "small"], config, sizes, {"big": node(3 * 1.5), "small": node(1.5)}, max_batch=1, max_context=8)
    assert p.parallel == "pipeline" and "phi3 has no shard()" in p.reason
    assert p.split[0] > p.split[1] and sum(p.split) == 12
    assert [n.layers for n in p.ranks] == [(0, p.split[0]), (p.split[0], 12)]
    assert not p.problems


def test_explicit_layers_override_memory(tiny):
    config, sizes = tiny
    p = place(["a", "b", "c"], config, sizes, {h: node(8) for h in "abc"}, layers={"b": 2}, max_batch=1)
    assert p.split == [5, 2, 5]
    bad = place(["a", "b"], config, sizes, {h: node(8) for h in "ab"}, layers={"a": 12})
    assert bad.problems and "cluster_layers" in bad.problems[0] and "sum to 12" in bad.problems[0]


def test_a_rank_that_does_not_fit_is_named_with_its_shortfall_and_fixes(tiny):
    config, sizes = tiny
    # 0.51 GiB on "b" cannot hold the 0.5 GiB runtime overhead plus 8 x 2048 tokens of KV cache for a layer
    p = place(["a", "b"], config, sizes, {"a": node(1), "b": node(0.51)}, max_batch=8)
    assert len(p.problems) >= 1
    msg = [m for m in p.problems if m.startswith("b: rank 1")][0]
    assert "GiB short" in msg and "more ranks" in msg and "quantized model" in msg and "max_context" in msg
    short = float(msg.split(" GiB short")[0].rsplit(" ", 1)[1])
    need = p.ranks[1]
    assert short == pytest.approx((need.need - need.available) / GiB, abs=0.01)
    # a smaller context makes it fit
    assert not place(["a", "b"], config, sizes, {"a": node(1), "b": node(0.51)}, max_batch=1, max_context=512).problems


def test_the_prompt_cache_counts_and_a_rank_it_overflows_is_named(tiny):
    config, sizes = tiny
    fp = footprint(config, sizes, 2048)
    nodes = {"a": node(0.8), "b": node(0.8)}
    # weights, 2 x 2048 tokens of KV cache and the runtime (about 0.55 GiB) fit; the prompt cache's 1 GiB on top does not
    base = place(["a", "b"], config, sizes, nodes, max_batch=2, max_context=2048)
    assert not base.problems and all(r.prompt_cache == 0 for r in base.ranks)
    full = fp.kv_bytes_per_token_layer * 12 * 2048  # one full-context sequence of the whole model
    p = place(
        ["a", "b"],
        config,
        sizes,
        nodes,
        max_batch=2,
        max_context=2048,
        prompt_cache_bytes=GiB,
        prompt_cache_size=10**6,
        layers={"a": 6, "b": 6},
    )
    assert [r.prompt_cache for r in p.ranks] == [GiB // 2, GiB // 2]  # each holds its layers' share
    assert [r.need - b.need for r, b in zip(p.ranks, base.ranks)] == [GiB // 2, GiB // 2]
    assert p.problems and all(m.startswith(("a: rank 0", "b: rank 1")) for m in p.problems)
    msg = p.problems[0]
    assert "prompt cache 0.50 GiB" in msg and "GiB short" in msg
    assert "a smaller prompt cache (cluster_runtime_settings prompt_cache_bytes, now 1.00 GiB" in msg
    # the entry count bounds it too: 3 sequences of the full context, whatever prompt_cache_bytes says
    few = place(
        ["a", "b"],
        config,
        sizes,
        nodes,
        max_batch=2,
        max_context=2048,
        prompt_cache_bytes=GiB,
        prompt_cache_size=3,
        layers={"a": 6, "b": 6},
    )
    assert sum(r.prompt_cache for r in few.ranks) == 3 * full and not few.problems
    # no byte bound: the entry count alone; no entries: no prompt cache
    from mlx_jaccl_cluster.ops.placement import prompt_cache_total

    assert prompt_cache_total(fp, 0, 4) == 4 * full and prompt_cache_total(fp, GiB, 0) == 0


def test_ranks_on_one_machine_share_its_memory(tiny):
    config, sizes = tiny
    nodes = {"r0": node(1.01), "r1": node(1.01)}
    alone = place(["r0", "r1"], config, sizes, nodes, max_batch=1, max_context=64)
    shared = place(["r0", "r1"], config, sizes, nodes, max_batch=1, max_context=64, machines={"r0": "m", "r1": "m"})
    assert not alone.problems
    assert shared.ranks[0].available == alone.ranks[0].available // 2
    assert shared.problems and "shared by 2 ranks" in shared.problems[0]


def test_tensor_layout_holds_a_share_of_every_layer(tmp_path):
    from mlx_jaccl_cluster.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "llama", arch="llama")
    config, sizes = json.loads((folder / "config.json").read_text()), tensor_sizes(folder)
    p = place(["a", "b"], config, sizes, {h: node(8) for h in "ab"}, max_batch=1)
    assert p.parallel == "tensor" and p.split == []
    fp = footprint(config, sizes)
    assert p.ranks[0].weights == fp.shared_bytes + sum(fp.layer_bytes) // 2
    bad = place(["a", "b"], config, sizes, {h: node(8) for h in "ab"}, layers={"a": 3})
    assert "cluster_layers" in bad.problems[0] and "tensor" in bad.problems[0]


def test_wired_limit_parser():
    from mlx_jaccl_cluster.ops.placement import parse_wired_limit

    assert parse_wired_limit("57344\n") == 57344
    assert parse_wired_limit("0") is None  # unset: macOS's default limit applies
    assert parse_wired_limit("") is None
    assert parse_wired_limit("sysctl: unknown oid 'iogpu.wired_limit_mb'") is None


def test_place_plan_renders_the_split_into_every_rank(tmp_path):
    from mlx_jaccl_cluster.models.tiny import build_tiny_model
    from mlx_jaccl_cluster.ops.placement import place_plan

    folder = build_tiny_model(tmp_path / "granite", arch="granite")
    plan = {
        "ranks": ["m1", "m2"],
        "parallel": "auto",
        "hosts": {h: {"ssh": h, "env": {"MJC_PARALLEL": "auto"}} for h in ("m1", "m2")},
    }
    nodes = {
        "m1": {"system": "Darwin", "memory_bytes": 64 * GiB, "wired_limit_mb_raw": "0"},
        "m2": {"system": "Darwin", "memory_bytes": 64 * GiB, "wired_limit_mb_raw": str(22 * 1024)},
    }
    out = place_plan(plan, str(folder), nodes, "auto", {"max_batch": 1})
    assert not out["problems"]
    placed = out["plan"]
    assert placed["parallel"] == "pipeline" and placed["parallel_reason"] == "auto: granite has no shard() in mlx-lm"
    assert placed["split"] == [4, 2]  # 44.8 GiB (70% of 64) against a 22 GiB wired limit
    assert {placed["hosts"][h]["env"]["MJC_PIPELINE_SPLIT"] for h in ("m1", "m2")} == {"4,2"}
    assert placed["hosts"]["m1"]["env"]["MJC_PARALLEL"] == "auto"  # each rank resolves it the same way
    assert plan["hosts"]["m1"]["env"] == {"MJC_PARALLEL": "auto"}  # the input is not changed
    assert place_plan(plan, str(folder), nodes, "auto", {}, {"m2": 5})["plan"]["split"] == [1, 5]
    missing = place_plan(plan, str(tmp_path / "nowhere"), nodes, "auto")
    assert "cannot read" in missing["problems"][0]


# --------------------------------------------------------------------------- disk


def _model_manifest(n_files=4, file_gib=10):
    """A Llama-70B-like folder: ``n_files`` weight files of ``file_gib`` GiB, an index, config."""
    files = {f"model-{i:05d}-of-{n_files:05d}.safetensors": {"size": file_gib * GiB} for i in range(1, n_files + 1)}
    return {"files": files | {"model.safetensors.index.json": {"size": 100_000}, "config.json": {"size": 1_000}}}


def _disk(free_gib, present=None, prefix_dev=1, prefix_free_gib=None):
    return {
        "prefix": {"path": "/Users/me/mjc", "dev": prefix_dev, "free": int((prefix_free_gib or free_gib) * GiB)},
        "model": {"path": "/Users/me/mjc", "dev": 1, "free": int(free_gib * GiB)},
        "present": present or {},
    }


def test_a_small_mac_holding_its_quarter_passes_and_one_that_cannot_is_named():
    from mlx_jaccl_cluster.ops.manifest import node_manifest
    from mlx_jaccl_cluster.ops.placement import disk_problems

    whole = _model_manifest()
    quarter = node_manifest(whole, ["config.json", "model-00002-of-00004.safetensors"], [[20, 40]])
    headroom = 2 * GiB
    # 15 GiB free: a quarter (10 GiB) + headroom fits; the whole model (40 GiB) would not
    assert disk_problems("mini", _disk(15), quarter, headroom) == []
    [whole_problem] = disk_problems("mini", _disk(15), whole, headroom)
    assert whole_problem.startswith(
        "mini: /Users/me/mjc has 15.00 GiB free but needs 42.00 GiB (the whole model, 6 files"
    )
    assert "cluster_parallel: pipeline" in whole_problem
    [problem] = disk_problems("mini", _disk(11), quarter, str(headroom))  # Ansible may render it as a string
    assert problem == (
        "mini: /Users/me/mjc has 11.00 GiB free but needs 12.00 GiB (share 2 of 6 files (layers 20-39): 10.00 GiB "
        "still to copy of 10.00 GiB, + 2.00 GiB for the venv and wheels): 1.00 GiB short. Fixes: free 1.00 GiB "
        "there; put cluster_install_prefix and cluster_model_path on a larger volume; fewer layers on this node "
        "(cluster_layers) and more on a node with room; more ranks; a smaller (quantized) model"
    )


def test_files_already_in_place_need_no_room_and_two_volumes_are_checked_apart():
    from mlx_jaccl_cluster.ops.placement import disk_problems

    whole = _model_manifest()
    # a second run: the copy is there (same sizes), so only the headroom must be free
    present = {rel: meta["size"] for rel, meta in whole["files"].items()}
    assert disk_problems("m", _disk(3, present), whole, 2 * GiB) == []
    present["model-00001-of-00004.safetensors"] = 5  # a truncated file is copied again
    assert "10.00 GiB still to copy of 40.00 GiB" in disk_problems("m", _disk(3, present), whole, 2 * GiB)[0]
    # the model on its own volume: each is checked against its own free space
    assert disk_problems("m", _disk(41, prefix_dev=2, prefix_free_gib=3), whole, 2 * GiB) == []
    [short] = disk_problems("m", _disk(41, prefix_dev=2, prefix_free_gib=1), whole, 2 * GiB)
    assert "has 1.00 GiB free but needs 2.00 GiB (2.00 GiB for the venv and wheels)" in short
    one_file = {"files": {"model.safetensors": {"size": 3 * GiB}}}  # no index: a pipeline would not help
    [problem] = disk_problems("m", _disk(1), one_file, 0)
    assert "cluster_parallel" not in problem and "cluster_layers" not in problem
    assert "has 1.00 GiB free but needs 3.00 GiB" in problem
    assert disk_problems("m", _disk(0.5), {"files": {}}, 1 << 20) == []  # before the model is known
    [small] = disk_problems("m", _disk(0.001), {"files": {}}, 100 << 20)
    assert "has 1.0 MiB free but needs 100.0 MiB" in small
