"""Each node gets what it serves: a pipeline rank started on a folder holding only its
share of a multi-file model (stage_files.py picks the files, as the model role copies
them) loads from it and answers token for token like in-process mlx-lm on the whole model;
a tied model's later stage keeps the embeddings; a share missing a file it needs is
refused at start naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import Cluster, reference_text

from mlx_jaccl_cluster import stage_files
from mlx_jaccl_cluster.layout import num_layers
from mlx_jaccl_cluster.models.tiny import build_tiny_model, reshard
from mlx_jaccl_cluster.ops.manifest import files

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "def add(a, b):"]


def shares(model: Path, split: list[int], root: Path, reverse: bool = False) -> list[Path]:
    """One folder per rank holding only what its stage needs (as the model role syncs it);
    ``reverse``: mlx-lm's PipelineMixin order (rank 0 runs the last layers)."""
    import json

    config = json.loads((model / "config.json").read_text())
    weight_map = stage_files.read_weight_map(model)
    every = [str(p.relative_to(model)) for p in files(model)]
    out = []
    for rank in range(len(split)):
        stage = stage_files.stage_range(split, rank, reverse)
        keep = stage_files.node_files(every, weight_map, num_layers(config), [stage])
        folder = root / f"rank{rank}" / model.name
        folder.mkdir(parents=True)
        for rel in keep:
            shutil.copy2(model / rel, folder / rel)
        out.append(folder)
    return out


def per_rank_cluster(folders: list[Path], workdir: Path, split: list[int]) -> Cluster:
    from mlx_jaccl_cluster.launch import start_group

    class PerRank(Cluster):
        def rank_env(self, rank: int) -> dict:
            return super().rank_env(rank) | {"MJC_MODEL": str(folders[rank])}

    return start_group(folders[0], len(folders), workdir, parallel="pipeline", split=split, group_class=PerRank)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-files")
    built = {}
    for name, arch, tie in (("untied", "mistral", False), ("tied", "mistral", True), ("native", "qwen2", False)):
        built[name] = build_tiny_model(root / name, arch=arch, tie_word_embeddings=tie)
        reshard(built[name], 4)
    return built


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_each_rank_serves_from_its_share(kind, models, tmp_path):
    model, split = models[kind], [4, 2]
    folders = shares(model, split, tmp_path / "nodes")
    held = [sorted(p.name for p in f.glob("*.safetensors")) for f in folders]
    assert held[0] == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    if kind == "untied":  # the later stage has neither the embedding file nor the first layers'
        assert held[1] == ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]
    else:  # tied: the embeddings compute every rank's logits, so the later stage has them too
        assert held[1] == [
            "model-00001-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
        ]
    assert all((f / "config.json").is_file() and (f / "tokenizer.json").is_file() for f in folders)

    cluster = per_rank_cluster(folders, tmp_path / "c", split)
    try:
        health = cluster.wait_ready()
        assert health["ranks_up"] == 2 and health["parallel"] == "pipeline"
        assert "layers 4..5 of 6 (split [4, 2]), from this node's share of the files" in cluster.log(1)
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            got = cluster.chat(prompt, max_tokens=16)["choices"][0]["message"]["content"]
            assert got == reference_text(model, messages=messages, max_tokens=16)
    finally:
        cluster.stop()


def test_a_share_without_a_file_it_needs_is_refused_naming_it(models, tmp_path):
    model, split = models["untied"], [4, 2]
    folders = shares(model, split, tmp_path / "nodes")
    (folders[1] / "model-00003-of-00004.safetensors").unlink()
    cluster = per_rank_cluster(folders, tmp_path / "c", split)
    try:
        rank1 = cluster.procs[1]
        rank1.wait(timeout=600)  # it stops at load (slow to start on a busy machine)
        assert rank1.returncode != 0
        log = cluster.log(1)
        assert "lacks weight files named in its index that this rank needs (this rank's layers 4..5)" in log
        assert "model-00003-of-00004.safetensors" in log and "re-sync" in log
    finally:
        cluster.stop()


def test_mlx_lm_pipeline_ranks_serve_their_reversed_shares(models, tmp_path):
    """qwen2 has mlx-lm's own pipeline(), which runs the split in reverse: rank 0 holds the
    last layers (and no embedding file), rank 1 the first; each serves from that share."""
    model, split = models["native"], [4, 2]
    folders = shares(model, split, tmp_path / "nodes", reverse=True)
    held = [sorted(p.name for p in f.glob("*.safetensors")) for f in folders]
    assert held == [
        ["model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"],
        ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00004-of-00004.safetensors"],
    ]
    cluster = per_rank_cluster(folders, tmp_path / "c", split)
    try:
        assert cluster.wait_ready()["ranks_up"] == 2
        assert "mlx-lm pipeline(), layers 2..5 of 6 (split [4, 2]), from this node's share" in cluster.log(0)
        assert "mlx-lm pipeline(), layers 0..1 of 6 (split [4, 2]), from this node's share" in cluster.log(1)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        got = cluster.chat(PROMPTS[0], max_tokens=16)["choices"][0]["message"]["content"]
        assert got == reference_text(model, messages=messages, max_tokens=16)
    finally:
        cluster.stop()
