"""Sampling defaults: a request's value, else the cluster's setting, else the model's
generation_config.json, else OpenAI's default; a bad generation_config names the key."""

import json

import pytest

from mlx_jaccl_cluster.engine.loader import ModelError, read_generation_config
from mlx_jaccl_cluster.generation import SAMPLING_DEFAULTS, SamplingDefaults
from mlx_jaccl_cluster.settings import Settings


def test_precedence_request_settings_file_builtin():
    d = SamplingDefaults.resolve({"top_p": 0.8, "temperature": None}, {"temperature": 0.2, "top_p": 0.9, "top_k": 20})
    assert d.values == {"temperature": 0.2, "top_p": 0.8, "top_k": 20, "min_p": 0.0, "repetition_penalty": None}
    assert d.sources == {
        "temperature": "generation_config",
        "top_p": "settings",
        "top_k": "generation_config",
        "min_p": "builtin",
        "repetition_penalty": "builtin",
    }
    assert d.pick("temperature", None) == 0.2
    assert d.pick("temperature", 0.0) == 0.0  # a request's own 0 is a value, not "unset"
    assert d.describe()["top_p"] == {"value": 0.8, "source": "settings"}


def test_generation_config_fields(tmp_path):
    assert read_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": [1, 2]})
    )
    assert read_generation_config(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


@pytest.mark.parametrize(
    "content,words",
    [
        ("{nope", ["not valid JSON"]),
        ("[1]", ["JSON object"]),
        (json.dumps({"temperature": -1}), ["temperature is -1", ">= 0", "default_temperature"]),
        (json.dumps({"top_p": 0}), ["top_p is 0", "(0, 1]"]),
        (json.dumps({"top_k": 2.5}), ["top_k is 2.5", "integer"]),
        (json.dumps({"min_p": "0.1"}), ["min_p is '0.1'"]),
        (json.dumps({"repetition_penalty": True}), ["repetition_penalty is True"]),
    ],
)
def test_bad_generation_config_is_named(tmp_path, content, words):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ModelError) as err:
        read_generation_config(tmp_path)
    assert "generation_config.json" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_settings_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MJC_DEFAULT_TEMPERATURE", "0.3")
    s = Settings(model=tmp_path)
    assert s.sampling_overrides == {name: (0.3 if name == "temperature" else None) for name in SAMPLING_DEFAULTS}
    monkeypatch.setenv("MJC_DEFAULT_TOP_P", "0")
    with pytest.raises(ValueError, match="default_top_p"):
        Settings(model=tmp_path)
