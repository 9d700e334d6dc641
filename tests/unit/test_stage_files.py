"""Which weight files a pipeline stage needs (stage_files.py), on indexes shaped like real
checkpoints: layers spanning files, untied and tied embeddings, MTP layers past the stack;
the plan's per-node file lists (ops/placement.py) and the cut manifest (ops/manifest.py)."""

from __future__ import annotations

import json

import pytest

from mlx_jaccl_cluster import stage_files
from mlx_jaccl_cluster.ops import manifest
from mlx_jaccl_cluster.ops.placement import GiB, place_plan

LLAMA_PARTS = [
    "input_layernorm",
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "post_attention_layernorm",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
]


def llama_index(n_layers: int, n_files: int, tied: bool = False, extra_layers: int = 0) -> dict[str, str]:
    """A weight map laid out like a converted Llama checkpoint (model-0000i-of-0000n): the
    embedding first, the layers in order, filled file by file so that layers span files,
    the norm and head in the last file; ``extra_layers`` MTP layers after the stack."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers + extra_layers):
        names += [f"model.layers.{i}.{p}.weight" for p in LLAMA_PARTS]
    names += ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    return {n: f"model-{i * n_files // len(names) + 1:05d}-of-{n_files:05d}.safetensors" for i, n in enumerate(names)}


def files_of(weight_map, layer):
    return {f for n, f in weight_map.items() if f".layers.{layer}." in n}


def test_an_untied_llama_70b_stage_gets_its_layers_plus_the_head_and_no_embedding():
    wm = llama_index(80, 30)
    last = "model-00030-of-00030.safetensors"
    first = stage_files.stage_weight_files(wm, 80, 0, 20)
    assert "model-00001-of-00030.safetensors" in first and last in first  # embeddings; norm and head
    middle = stage_files.stage_weight_files(wm, 80, 40, 60)
    assert "model-00001-of-00030.safetensors" not in middle  # never evaluated there
    assert last in middle  # every rank computes the logits (engine/pipeline.py)
    expected = set().union(*(files_of(wm, i) for i in range(40, 60))) | {last}
    assert middle == expected and len(middle) <= 30 // 4 + 3  # a quarter of the files, plus the ends


def test_a_layer_spanning_two_files_brings_both():
    wm = llama_index(8, 5)
    spanning = [i for i in range(8) if len(files_of(wm, i)) == 2]
    assert spanning, "the index should have a layer split over two files"
    layer = spanning[0]
    got = stage_files.stage_weight_files(wm, 8, layer, layer + 1)
    assert files_of(wm, layer) <= got


def test_tied_embeddings_go_to_every_stage():
    wm = llama_index(16, 4, tied=True)
    assert stage_files.tied(wm) and not stage_files.tied(llama_index(16, 4))
    for start, end in ((0, 4), (4, 12), (12, 16)):
        assert "model-00001-of-00004.safetensors" in stage_files.stage_weight_files(wm, 16, start, end)


def test_mtp_layers_past_the_stack_go_nowhere_and_bad_ranges_are_refused():
    wm = llama_index(8, 10, extra_layers=2)
    ends = {f for n, f in wm.items() if ".layers." not in n}
    mtp_only = files_of(wm, 9) - set().union(*(files_of(wm, i) for i in range(8))) - ends
    assert mtp_only
    assert not mtp_only & stage_files.stage_weight_files(wm, 8, 4, 8)
    with pytest.raises(ValueError, match="not within the model's 8 layers"):
        stage_files.stage_weight_files(wm, 8, 6, 9)


def test_node_files_add_config_and_tokenizer_and_leave_out_bookkeeping():
    wm = llama_index(8, 4)
    every = sorted(set(wm.values())) + [
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "mjc-manifest.json",
        ".mjc-verified",
    ]
    got = stage_files.node_files(every, wm, 8, [(6, 8)])
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(got)
    assert "mjc-manifest.json" not in got and ".mjc-verified" not in got
    # two ranks on one machine: the union of their stages
    both = stage_files.node_files(every, wm, 8, [(0, 2), (6, 8)])
    assert set(both) == set(got) | set(stage_files.node_files(every, wm, 8, [(0, 2)]))
    assert stage_files.node_files(every, None, 8, [(0, 4)]) is None  # a one-file model goes whole


def test_a_bad_index_is_named(tmp_path):
    (tmp_path / stage_files.INDEX).write_text("{not json")
    with pytest.raises(stage_files.StageFilesError, match="not a valid weight index"):
        stage_files.read_weight_map(tmp_path)
    (tmp_path / stage_files.INDEX).write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(stage_files.StageFilesError, match="must map tensor names to file names"):
        stage_files.read_weight_map(tmp_path)
    assert stage_files.read_weight_map(tmp_path / "none") is None


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from mlx_jaccl_cluster.models.tiny import build_tiny_model, reshard

    folder = build_tiny_model(tmp_path_factory.mktemp("m") / "granite", arch="granite")
    reshard(folder, 4)
    return folder


def plan_of(hosts, ssh=None):
    return {
        "ranks": list(hosts),
        "parallel": "auto",
        "hosts": {h: {"ssh": (ssh or {}).get(h, h), "prefix": "/opt/p", "env": {}} for h in hosts},
    }


def test_the_plan_gives_each_pipeline_node_its_files(sharded):
    nodes = {h: {"system": "Linux", "memory_bytes": 8 * GiB} for h in ("a", "b", "c")}
    out = place_plan(plan_of(["a", "b"]), str(sharded), nodes, "auto", {"max_batch": 1})
    assert not out["problems"] and out["plan"]["split"] == [3, 3]
    a, b = (out["plan"]["hosts"][h]["model_files"] for h in ("a", "b"))
    weights = lambda files: [f for f in files if f.endswith(".safetensors")]  # noqa: E731
    # reshard: file 1 embeddings + layers 0-1, 2 layers 1-3, 3 layers 3-4, 4 layers 4-5 + norm + head
    assert weights(a) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 4)]
    assert weights(b) == [f"model-0000{i}-of-00004.safetensors" for i in (2, 3, 4)]
    assert "config.json" in b and "tokenizer.json" in b
    assert [out["plan"]["hosts"][h]["model_layers"] for h in ("a", "b")] == [[[0, 3]], [[3, 6]]]
    assert "b: receives 8 of the model's files (layers 3-5)" in out["summary"]
    # two ranks on one machine (same ssh target and prefix) share one folder: the union
    shared = place_plan(plan_of(["a", "b", "c"], {"c": "a"}), str(sharded), nodes, "auto", {"max_batch": 1})["plan"]
    assert shared["hosts"]["a"]["model_files"] == shared["hosts"]["c"]["model_files"]
    wm, split = stage_files.read_weight_map(sharded), shared["split"]
    a_stage = stage_files.stage_weight_files(wm, 6, 0, split[0])
    c_stage = stage_files.stage_weight_files(wm, 6, 6 - split[2], 6)
    assert set(weights(shared["hosts"]["a"]["model_files"])) == a_stage | c_stage != c_stage
    assert (
        shared["hosts"]["a"]["model_layers"]
        == [[0, split[0]], [6 - split[2], 6]]
        == shared["hosts"]["c"]["model_layers"]
    )


def test_tensor_layouts_and_one_file_models_get_every_file(sharded, tmp_path):
    from mlx_jaccl_cluster.models.tiny import build_tiny_model

    nodes = {h: {"system": "Linux", "memory_bytes": 8 * GiB} for h in ("a", "b")}
    llama = build_tiny_model(tmp_path / "llama", arch="llama")
    reshard_free = place_plan(plan_of(["a", "b"]), str(llama), nodes, "pipeline", {"max_batch": 1})["plan"]
    assert reshard_free["split"] and all(
        set(reshard_free["hosts"][h]["model_files"]) >= {"model.safetensors", "config.json"} for h in "ab"
    )
    tensor = place_plan(plan_of(["a", "b"]), str(llama), nodes, "tensor", {"max_batch": 1})["plan"]
    assert all("model_files" not in tensor["hosts"][h] and "model_layers" not in tensor["hosts"][h] for h in "ab")


def test_a_cut_manifest_verifies_the_share_and_flags_other_weight_files(sharded, tmp_path):
    import shutil

    full = manifest.build(sharded)
    keep = ["config.json", "model-00004-of-00004.safetensors", "tokenizer.json"]
    cut = {"files": {k: v for k, v in full["files"].items() if k in keep}, "of_files": len(full["files"])}
    node = tmp_path / "node"
    node.mkdir()
    for rel in keep:
        shutil.copy2(sharded / rel, node / rel)
    assert manifest.problems(node, cut) == []
    shutil.copy2(sharded / "model-00001-of-00004.safetensors", node / "model-00001-of-00004.safetensors")
    (issue,) = manifest.problems(node, cut)
    assert issue.startswith("model-00001-of-00004.safetensors: not this node's share")
    assert manifest.problems(node, full)  # the whole-model manifest names what the share lacks


def test_mlx_lm_pipeline_order_is_reversed_and_a_class_of_its_own_gets_every_file(tmp_path):
    from mlx_jaccl_cluster.models.tiny import build_tiny_model, reshard
    from mlx_jaccl_cluster.ops.placement import place

    assert stage_files.stage_range([4, 2], 0) == (0, 4) and stage_files.stage_range([4, 2], 1) == (4, 6)
    assert stage_files.stage_range([4, 2], 0, reverse=True) == (2, 6)  # PipelineMixin: rank 0 runs the last
    assert stage_files.stage_range([4, 2], 1, reverse=True) == (0, 2)
    qwen2 = build_tiny_model(tmp_path / "qwen2", arch="qwen2")
    reshard(qwen2, 4)
    nodes = {h: {"system": "Linux", "memory_bytes": 8 * GiB} for h in "ab"}
    plan = plan_of(["a", "b"])
    plan["hosts"]["a"]["layers"], plan["hosts"]["b"]["layers"] = 4, 2
    out = place_plan(plan, str(qwen2), nodes, "pipeline", {"max_batch": 1})
    assert "rank 0 a: layers 2..5" in "\n".join(out["summary"]) and "rank 1 b: layers 0..1" in "\n".join(out["summary"])
    files = {h: [f for f in out["plan"]["hosts"][h]["model_files"] if f.endswith(".safetensors")] for h in "ab"}
    assert files["a"] == [f"model-0000{i}-of-00004.safetensors" for i in (2, 3, 4)]
    assert files["b"] == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 4)]
    # generic_pipeline: our own split, forward order
    generic = place_plan(plan, str(qwen2), nodes, "pipeline", {"max_batch": 1, "generic_pipeline": True})
    assert "rank 0 a: layers 0..3" in "\n".join(generic["summary"])
    # qwen3_next defines its own pipeline(): its order is not known here, so every file goes
    config = {"model_type": "qwen3_next", "num_hidden_layers": 4, "num_attention_heads": 4}
    sizes = {f"model.layers.{i}.w": 1000 for i in range(4)} | {"model.embed_tokens.weight": 10}
    own = place(["a", "b"], config, sizes, nodes, "pipeline", max_batch=1, max_context=16)
    assert own.split == [2, 2] and not own.layers_known
