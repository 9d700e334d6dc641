"""The split decision (layout.py), shared by the plan and the ranks, and the generic
pipeline's split arithmetic (engine/pipeline.py)."""

import pytest

from mlx_jaccl_cluster.engine.pipeline import SplitError, check_split, even_split, layer_range
from mlx_jaccl_cluster.layout import Layout, LayoutError, capabilities, choose, num_layers


def cfg(model_type, heads=6, kv=6, layers=6, mlp=None):
    config = {
        "model_type": model_type,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
    }
    return config | ({"intermediate_size": mlp} if mlp else {})


def test_capabilities_are_read_from_the_installed_mlx_lm():
    assert capabilities("llama") == (True, False)
    assert capabilities("qwen2") == (True, True)
    assert capabilities("mistral") == (True, False)  # mlx-lm remaps it to llama
    assert capabilities("gemma3_text") == (False, False)
    assert capabilities("phi3") == (False, False)
    assert capabilities("no_such_model") == (False, False)


@pytest.mark.parametrize(
    "config, world, parallel, words",
    [
        (cfg("llama"), 2, "tensor", "shards in mlx-lm and its heads and MLP divide by 2"),
        (cfg("llama", heads=9, kv=3), 2, "pipeline", "num_attention_heads (9) is not divisible by 2"),
        (cfg("llama", heads=9, kv=3), 3, "tensor", "divide by 3"),
        (cfg("phi3"), 2, "pipeline", "phi3 has no shard() in mlx-lm"),
        (cfg("qwen2", heads=7, kv=7), 2, "pipeline", "num_key_value_heads (7)"),
        (cfg("llama"), 1, "none", "one rank"),
        # heads divide by 3 but mlx-lm's shard() cannot split a 2048-wide MLP three ways
        (cfg("qwen2", heads=12, kv=6, mlp=2048), 3, "pipeline", "intermediate_size (2048) is not divisible by 3"),
        (cfg("qwen2", heads=12, kv=6, mlp=2048), 2, "tensor", "heads and MLP divide by 2"),
        (
            cfg("qwen3_moe", heads=12, kv=6, mlp=1536) | {"moe_intermediate_size": 200},
            3,
            "pipeline",
            "moe_intermediate_size (200) is not divisible by 3",
        ),
        ({"model_type": "gemma3", "text_config": cfg("gemma3_text", heads=4, kv=1)}, 2, "pipeline", "no shard()"),
    ],
)
def test_auto(config, world, parallel, words):
    layout = choose(config, world, "auto")
    assert layout.parallel == parallel and words in layout.reason


def test_auto_uses_mlx_lm_pipeline_where_the_class_has_one():
    assert choose(cfg("qwen2", heads=7, kv=7), 2).native_pipeline
    assert not choose(cfg("phi3"), 2).native_pipeline


def test_requested_tensor_that_cannot_work_is_refused_with_the_fix():
    with pytest.raises(LayoutError, match=r"no tensor-parallel split in mlx-lm.*parallel=pipeline or auto"):
        choose(cfg("phi3"), 2, "tensor")
    with pytest.raises(LayoutError, match=r"num_attention_heads \(9\) is not divisible by 2.*\[1, 3\]"):
        choose(cfg("llama", heads=9, kv=3), 2, "tensor")
    with pytest.raises(LayoutError, match="one of auto, tensor, pipeline"):
        choose(cfg("llama"), 2, "data")


def test_nccl_pipelines_hand_over_by_all_gather():
    """MLX's nccl backend has no send/recv (measured, docs/BENCHMARKS.md): a pipeline there
    hands its hidden state on with all_gather, through the generic split (mlx-lm's own
    pipeline() sends)."""
    assert choose(cfg("llama"), 2, "auto", "nccl").parallel == "tensor"
    phi3 = choose(cfg("phi3"), 2, "auto", "nccl")
    assert (phi3.parallel, phi3.handover, phi3.native_pipeline) == ("pipeline", "all_gather", False)
    assert (
        phi3.reason
        == "auto: phi3 has no shard() in mlx-lm; stages hand over by all_gather (MLX's nccl backend has no send/recv)"
    )
    qwen2 = choose(cfg("qwen2"), 2, "pipeline", "nccl")
    assert (qwen2.handover, qwen2.native_pipeline) == ("all_gather", False)
    with pytest.raises(
        LayoutError, match=r"pipeline_transport=send cannot run on nccl: .*send/recv; use auto or all_gather"
    ):
        choose(cfg("phi3"), 2, "auto", "nccl", "send")
    with pytest.raises(LayoutError, match=r"num_attention_heads \(9\).*parallel=pipeline or auto"):
        choose(cfg("llama", heads=9, kv=3), 2, "tensor", "nccl")
    # ring and jaccl send; all_gather may be asked for anywhere (then the generic split runs)
    assert choose(cfg("qwen2"), 2, "pipeline", "jaccl") == Layout("pipeline", "requested", True, "send")
    assert choose(cfg("qwen2"), 2, "pipeline", "ring", "all_gather") == Layout(
        "pipeline", "requested; stages hand over by all_gather", False, "all_gather"
    )
    with pytest.raises(LayoutError, match="pipeline_transport must be one of auto, send, all_gather"):
        choose(cfg("phi3"), 2, "auto", "ring", "rdma")


def test_settings_refuse_a_send_hand_over_on_nccl(tmp_path, monkeypatch):
    from mlx_jaccl_cluster.settings import Settings

    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    with pytest.raises(ValueError, match="pipeline_transport=send cannot run on nccl"):
        Settings(model=tmp_path, world_size=1, rank=0, backend="nccl", pipeline_transport="send")
    assert Settings(model=tmp_path, world_size=1, rank=0, backend="nccl").pipeline_transport == "auto"


def test_num_layers_reads_nested_and_renamed_fields():
    assert num_layers(cfg("llama", layers=30)) == 30
    assert num_layers({"text_config": {"num_hidden_layers": 26}}) == 26
    assert num_layers({"num_layers": 12}) == 12
    assert num_layers({}) is None


def test_even_split_and_ranges():
    assert even_split(30, 2) == [15, 15]
    assert even_split(7, 3) == [3, 2, 2]
    assert [layer_range([4, 1, 1], r) for r in range(3)] == [(0, 4), (4, 5), (5, 6)]


@pytest.mark.parametrize(
    "split, words",
    [
        ([3, 2], "sum to the model's 6 layers"),
        ([6, 0], "at least one layer"),
        ([2, 2, 2], "3 entries for 2 ranks"),
    ],
)
def test_bad_splits_are_named(split, words):
    with pytest.raises(SplitError, match=words):
        check_split(split, 6, 2)


def test_settings_parse_the_split_and_refuse_what_cannot_run(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from mlx_jaccl_cluster.settings import Settings

    for var in ("MLX_RANK", "MLX_WORLD_SIZE", "MLX_HOSTFILE"):
        monkeypatch.delenv(var, raising=False)
    base = {"model": tmp_path, "world_size": 2, "control": "127.0.0.1:1", "cluster_secret": "s" * 24}
    s = Settings(**base, pipeline_split="4, 2")
    assert s.pipeline_split == [4, 2] and s.parallel == "auto"
    with pytest.raises(ValidationError, match="comma-separated layer counts"):
        Settings(**base, pipeline_split="4,x")
    with pytest.raises(ValidationError, match="3 entries for 2 ranks"):
        Settings(**base, pipeline_split="2,2,2")
    with pytest.raises(ValidationError, match="parallel=tensor"):
        Settings(**base, pipeline_split="4,2", parallel="tensor")
    assert Settings(**base, max_context=4096).max_context == 4096


def test_max_context_caps_the_models_context(tmp_path, monkeypatch):
    from mlx_jaccl_cluster.engine.core import Engine
    from mlx_jaccl_cluster.engine.loader import LoadedModel
    from mlx_jaccl_cluster.settings import Settings
    from mlx_jaccl_cluster.state import ClusterState

    monkeypatch.delenv("MLX_HOSTFILE", raising=False)

    def engine(**kw):
        e = Engine(
            Settings(model=tmp_path, world_size=1, rank=0, **kw), ClusterState(1, "ring", "m"), None, lambda *a: None
        )
        e.loaded = LoadedModel(model=None, tokenizer=None, config={"max_position_embeddings": 2048})
        return e

    assert engine().context_length == 2048
    assert engine(max_context=512).context_length == 512
    assert engine(max_context=9000).context_length == 2048
