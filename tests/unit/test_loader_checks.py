"""A model folder that cannot be served is one clear message at start-up, naming the fix."""

import json
from pathlib import Path

import pytest

from mlx_jaccl_cluster.engine.loader import ModelError, check_split, check_weight_files, read_config


def folder(tmp_path: Path, **files) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    defaults = {
        "config.json": json.dumps({"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3}),
        "model.safetensors": "x",
        "tokenizer.json": "{}",
    }
    for name, content in (defaults | files).items():
        if content is not None:
            (d / name).write_text(content)
    return d


@pytest.mark.parametrize(
    "files,words",
    [
        ({"config.json": None}, ["config.json is missing"]),
        ({"config.json": "{not json"}, ["not valid JSON", "re-sync"]),
        ({"config.json": "{}"}, ["no model_type"]),
        ({"model.safetensors": None}, ["no *.safetensors", "mlx_lm.convert"]),
        ({"tokenizer.json": None}, ["no tokenizer"]),
        ({"model.safetensors.index.json": "{not json"}, ["not a valid weight index", "re-fetch"]),
    ],
)
def test_bad_folders_are_named(tmp_path, files, words):
    with pytest.raises(ModelError) as err:
        read_config(folder(tmp_path, **files))
    for word in words:
        assert word in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_config(tmp_path / "nope")


def test_good_folder_reads_its_config(tmp_path):
    assert read_config(folder(tmp_path))["model_type"] == "llama"


def test_tensor_split_must_divide_both_head_counts(tmp_path):
    config = read_config(folder(tmp_path))
    with pytest.raises(
        ModelError, match=r"num_attention_heads \(9\) is not divisible by 2.*splits over \[1, 3\] ranks"
    ):
        check_split(config, "tensor", 2)
    assert check_split(config, "tensor", 3).parallel == "tensor"
    assert check_split(config, "tensor", 1).parallel == "none"


def test_auto_picks_pipeline_where_tensor_cannot_split(tmp_path):
    config = read_config(folder(tmp_path))
    two = check_split(config, "auto", 2)
    assert (two.parallel, two.native_pipeline) == ("pipeline", False)
    assert "num_attention_heads (9) is not divisible by 2" in two.reason
    assert check_split(config, "auto", 3).parallel == "tensor"


def test_missing_weight_files_are_named_for_the_whole_model_or_the_stage(tmp_path):
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-1.safetensors",
            "model.layers.0.w": "model-1.safetensors",
            "model.layers.1.w": "model-2.safetensors",
            "lm_head.weight": "model-2.safetensors",
        }
    }
    d = folder(tmp_path, **{"model.safetensors.index.json": json.dumps(index), "model-2.safetensors": ""})
    config = {**json.loads((d / "config.json").read_text()), "num_hidden_layers": 2}
    with pytest.raises(ModelError, match="this rank needs: model-1.safetensors; re-sync"):
        check_weight_files(d, config)  # tensor layouts and one rank need every file
    with pytest.raises(ModelError, match=r"\(this rank's layers 0..0\): model-1.safetensors"):
        check_weight_files(d, config, (0, 1))
    assert check_weight_files(d, config, (1, 2)) is True  # the later stage's share is all there
    (d / "model-1.safetensors").write_text("")
    assert check_weight_files(d, config) is False
